"""Entry point: ``python -m streamml.train [+experiment=NAME] [-m] [key=value ...]``.

``main`` only composes the config; ``train(cfg)`` does the work, so tests and notebooks
call it directly. It loads the queries, cross-validates the configured learner on
per-query stratified folds, fits it once more on all the data (unless ``final_fit`` is
false, as in searches), and records everything
in MLflow. It returns the run's metrics; ``main`` returns ``cfg.objective`` for sweepers.

A config that cannot run here (``trainer=gpu`` without a GPU) fails before any data is
loaded or any MLflow run is opened, and a malformed data file before Lightning, MLflow or
the simulator is imported: each with one line naming the cause (file and row), in
seconds, and its traceback in ``train.log``. The run's lines go
through ``logging``, so Hydra writes them to ``train.log`` in the run's output folder as
well as the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import traceback

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig

from streamml.data import DataValidationError, load_queries  # numpy and pandas only

log = logging.getLogger("streamml.train")  # not __main__ under python -m


class StartupError(RuntimeError):
    """The config cannot run on this machine; raised before any data or MLflow run."""


def check_gpu(cfg: DictConfig) -> None:
    """Fail if the configured accelerator is a GPU that torch does not see (torch alone: fast)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto")) if "trainer" in cfg else "auto"
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        if not (torch.cuda.is_available() or (accelerator != "cuda" and torch.backends.mps.is_available())):
            raise StartupError(
                f"trainer.accelerator={accelerator} but torch sees no GPU on this machine; "
                "use trainer=cpu, or trainer.accelerator=auto to use a GPU only when one is visible")


def check_trainer(cfg: DictConfig) -> None:
    """Fail if the configured accelerator is missing: torch answers for a GPU, then Lightning
    builds the configured ``Trainer`` once, which rejects any other setting the machine lacks."""
    if "trainer" not in cfg:
        return
    check_gpu(cfg)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        instantiate(cfg.trainer)()
    except MisconfigurationException as err:
        raise StartupError(
            f"trainer.accelerator={cfg.trainer.accelerator} cannot run on this machine ({err}); "
            "use trainer=cpu, or trainer.accelerator=auto to use a GPU only when one is visible"
        ) from None


def _quiet_lightning() -> None:
    # Lightning's rank-zero info repeats on every fit: "GPU available: ...", "TPU available: ...",
    # a litlogger advert and "`Trainer.fit` stopped"; its warnings stay visible.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _fit_callbacks(cfg: DictConfig, label: str, loss_prefix: str = "") -> list:
    from streamml import tracking
    from streamml.offline.module import EpochProgress

    callbacks = [tracking.EpochLoss(loss_prefix)]
    if cfg.get("trainer", {}).get("enable_progress_bar"):
        callbacks.append(EpochProgress(label))
    return callbacks


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
    _quiet_lightning()
    check_gpu(cfg)
    # The data is read and validated before Lightning, MLflow and the simulator are imported:
    # a bad file then fails in about a second, naming the file and the row, not after 10-14 s.
    # A scenario with a runner of its own (the replay) reads its own data, not the query files.
    own_data = "scenario" in cfg and cfg.scenario.get("run") is not None
    data = None if own_data else load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    check_trainer(cfg)
    from streamml import tracking
    from streamml.offline.evaluate import evaluate, summarize

    if "scenario" in cfg:  # an online scenario names its runner (the simulator unless it says otherwise)
        return get_method(cfg.scenario.get("run", "streamml.online.simulate.run"))(cfg)
    log.info(f"{len(data.query_ids)} queries, {len(data.frame)} unique texts ({data.n_duplicates} duplicates merged) from {cfg.data.dir}")
    tags = {"data_fingerprint": data.fingerprint, "data_dir": str(cfg.data.dir), **cfg.get("run_tags", {})}  # run_tags: the loop's retrain
    cv_learner, final_learner = instantiate(cfg.learner), instantiate(cfg.learner)  # config errors fail before the run
    example = pd.DataFrame({"query_id": [data.query_ids[q] for q in data.query[:2]], "embedding": data.X[:2].tolist()})
    with tracking.start_run(cfg, tags=tags, run_name=_run_name(cfg)) as run:
        log.info(f"MLflow run {run.info.run_name} ({run.info.run_id}) in experiment '{cfg.name}' ({cfg.logger.tracking_uri})")
        table = evaluate(cv_learner, data, **cfg.cv, callbacks=_fit_callbacks(cfg, "cv", "cv_"))
        metrics, per_query = summarize(table)
        tracking.log_results(metrics, per_query, table)
        if cfg.final_fit:
            final = final_learner.fit(data.X, data.y, data.query, callbacks=_fit_callbacks(cfg, "final fit"))
            tracking.log_model(final, data.query_ids, cfg.data.embedding_dim, input_example=example)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        columns = ["query_id", "auc", "auc_std", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5"]
        log.info(f"mean over queries: auc {metrics['auc']:.3f} ± {metrics['auc_std']:.3f} (std over splits)\n"
                 + per_query[columns].to_string(index=False))
        if "tuning_auc" in metrics:
            log.info(f"nested CV: tuning auc (inner folds) {metrics['tuning_auc']:.3f}, held-out auc (outer folds) {metrics['auc']:.3f}")
        if cfg.final_fit:
            uri = f"runs:/{run.info.run_id}/model"
            log.info(f"model: {uri} (serve: mlflow models serve -m {uri} --env-manager local)")
    log.info(f"done: run {run.info.run_name} ({run.info.run_id}) in MLflow experiment '{cfg.name}' at {cfg.logger.tracking_uri} "
             f"(mlflow ui); plot {run.info.artifact_uri}/plots/per_query_auc.png")
    return metrics


class _TeeToLogFiles(io.TextIOBase):
    """``sys.stdout`` that also writes to the log files Hydra opened (``train.log``).

    Some parts print their results (the online benchmark's table) rather than log them;
    without this, ``train.log`` would miss what the console showed.
    """

    def __init__(self, console, files):
        self.console, self.files = console, files

    def write(self, text: str) -> int:
        self.console.write(text)
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        for f in self.files:
            f.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.console, name)


def _log_files() -> list:
    """The open streams of the root logger's file handlers (Hydra's ``train.log``); a handler
    closed by an earlier run in the same process has no stream and is left out."""
    return [h.stream for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and h.stream is not None and not h.stream.closed]


@contextlib.contextmanager
def _stdout_to_log():
    files = _log_files()
    if not files:
        yield
        return
    with contextlib.redirect_stdout(_TeeToLogFiles(sys.stdout, files)):
        yield


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        with _stdout_to_log():
            return train(cfg)[cfg.objective]
    except (StartupError, DataValidationError, FileNotFoundError) as err:
        # the user's input, not a bug: one line on the console, the traceback in train.log
        for stream in _log_files():
            stream.write(traceback.format_exc())
            stream.flush()
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
