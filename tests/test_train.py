"""End-to-end: `train(cfg)` on the shipped data, a 2-job multirun, and the real data's target."""

import dataclasses
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import REPO, SHARED_QUERIES, compose_cfg
from streamml.data import load_queries
from streamml.offline.evaluate import evaluate, summarize
from streamml.train import train

KEYS = ["auc", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5", "auc_std"]


def only_run(uri, experiment):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return mlflow.MlflowClient(uri).get_run(runs[0].info.run_id)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["linear_ranknet", "mlp_ranknet", "seed_river"])
def test_train_on_shipped_data_logs_everything(mlflow_uri, experiment, capsys):
    cfg = compose_cfg([f"+experiment={experiment}", f"data.dir={REPO / 'data' / 'queries'}"])
    metrics = train(cfg)
    data = load_queries(cfg.data.dir)
    run = only_run(mlflow_uri, experiment)
    assert run.info.status == "FINISHED"
    for key in KEYS + [f"auc.{q}" for q in data.query_ids]:
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    # The shipped topics carry a learnable preference: far above the same learner on labels shuffled per query.
    rng = np.random.default_rng(0)
    shuffled = dataclasses.replace(data, frame=data.frame.assign(
        label=data.frame.groupby("query")["label"].transform(lambda s: rng.permutation(s.to_numpy()))))
    null = summarize(evaluate(instantiate(cfg.learner), shuffled, n_folds=2, n_repeats=1))[0]["auc"]
    assert metrics["auc"] > null + 0.2, (metrics["auc"], null)
    assert run.data.tags["data_fingerprint"] == data.fingerprint
    assert run.data.params["name"] == experiment
    client = mlflow.MlflowClient(mlflow_uri)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("plots", "results") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"config.yaml", "plots/per_query_auc.png", "results/per_query.csv"} <= artifacts
    if experiment != "seed_river":
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(losses) == cfg.trainer.max_epochs and losses[-1].value < losses[0].value
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    frame = pd.DataFrame({"query_id": data.frame.query_id, "embedding": list(data.X)})
    scores = np.asarray(model.predict(frame))
    assert scores.shape == (len(frame),) and np.isfinite(scores).all()
    # The final model is fit on all rows, so it ranks its own training data well.
    accepted = scores[data.y == 1].mean() > scores[data.y == 0].mean()
    assert accepted
    assert capsys.readouterr().out.rstrip().splitlines()[-1].split()[0] == data.query_ids[-1]


def test_a_crash_mid_run_ends_failed(mlflow_uri, tmp_path, monkeypatch):
    cfg = compose_cfg([f"data.dir={REPO / 'data' / 'queries'}", "learner=sklearn_lr"])

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("streamml.tracking.log_model", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg)
    assert only_run(mlflow_uri, "default").info.status == "FAILED"


@pytest.mark.slow
def test_two_job_multirun_gives_two_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "streamml.train", "-m", "learner=sklearn_lr,river_stack", "name=two_jobs",
           f"data.dir={REPO / 'data' / 'queries'}", "cv.n_folds=2", "cv.n_repeats=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri})
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["two_jobs"])
    assert len(runs) == 2 and set(runs.status) == {"FINISHED"}
    assert set(runs["params.learner._target_"]) == {"streamml.offline.baselines.SklearnLR", "streamml.offline.baselines.RiverStack"}


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_QUERIES.is_dir(), reason=f"needs the shared data at {SHARED_QUERIES}")
def test_linear_ranknet_ties_sklearn_lr_on_real_data(mlflow_uri):
    """The heads tie tuned LR on the shared data (experiments/README.md): never worse by more than the spread over splits."""
    results = {}
    for overrides in (["+experiment=linear_ranknet"], ["learner=sklearn_lr", "learner.C=100"]):
        cfg = compose_cfg([*overrides, f"data.dir={SHARED_QUERIES}", "final_fit=false"], tiny=False)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
        results[overrides[0]] = train(cfg)
    ours, lr = results["+experiment=linear_ranknet"], results["learner=sklearn_lr"]
    assert ours["auc"] >= lr["auc"] - lr["auc_std"], (ours["auc"], lr["auc"], lr["auc_std"])
