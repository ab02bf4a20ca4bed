"""Entry point: ``python -m streamml.train [+experiment=NAME] [-m] [key=value ...]``.

``main`` only composes the config; ``train(cfg)`` does the work, so tests and notebooks
call it directly. It loads the queries, cross-validates the configured learner on
per-query stratified folds, fits it once more on all the data (unless ``final_fit`` is
false, as in searches), and records everything
in MLflow. It returns the run's metrics; ``main`` returns ``cfg.objective`` for sweepers.
"""

from __future__ import annotations

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from streamml import tracking
from streamml.online import simulate
from streamml.data import load_queries
from streamml.offline.evaluate import evaluate, summarize


def _run_name(cfg: DictConfig) -> str:
    if cfg.logger.get("run_name"):
        return cfg.logger.run_name
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return f"{choices.get('learner')}-{choices.get('loss')}"
    return cfg.learner._target_.rsplit(".", 1)[-1]


def train(cfg: DictConfig) -> dict[str, float]:
    """Cross-validate, fit on everything, log to MLflow; returns the metrics.

    A config with a ``scenario`` (the ``online_*`` experiments) runs the user simulator.
    """
    if "scenario" in cfg:
        return simulate.run(cfg)
    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    print(f"{len(data.query_ids)} queries, {len(data.frame)} unique texts ({data.n_duplicates} duplicates merged) from {cfg.data.dir}")
    tags = {"data_fingerprint": data.fingerprint, "data_dir": str(cfg.data.dir)}
    with tracking.start_run(cfg, tags=tags, run_name=_run_name(cfg)) as run:
        table = evaluate(instantiate(cfg.learner), data, **cfg.cv, callbacks=[tracking.EpochLoss("cv_")])
        metrics, per_query = summarize(table)
        tracking.log_results(metrics, per_query, table)
        if cfg.final_fit:
            final = instantiate(cfg.learner).fit(data.X, data.y, data.query, callbacks=[tracking.EpochLoss()])
            tracking.log_model(final, data.query_ids, cfg.data.embedding_dim)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(f"\nMLflow run {run.info.run_id} in experiment '{cfg.name}' ({cfg.logger.tracking_uri})")
        print(f"mean over queries: auc {metrics['auc']:.3f} ± {metrics['auc_std']:.3f} (std over splits)")
        if "tuning_auc" in metrics:
            print(f"nested CV: tuning auc (inner folds) {metrics['tuning_auc']:.3f}, held-out auc (outer folds) {metrics['auc']:.3f}")
        print(per_query[["query_id", "auc", "auc_std", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5"]].to_string(index=False))
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)[cfg.objective]


if __name__ == "__main__":
    main()
