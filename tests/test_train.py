"""End-to-end: `train(cfg)` on the shipped data, early config errors, quiet output, a 3-job
multirun with its summary and distinct run names, and the real data's target."""

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import REPO, compose_cfg
from streamml.data import load_queries
from streamml.offline.evaluate import evaluate, summarize
from streamml.train import StartupError, train

KEYS = ["auc", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5", "auc_std"]


def only_run(uri, experiment):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return mlflow.MlflowClient(uri).get_run(runs[0].info.run_id)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["linear_ranknet", "mlp_ranknet", "seed_river"])
def test_train_on_shipped_data_logs_everything(mlflow_uri, experiment, caplog):
    caplog.set_level(logging.INFO, logger="streamml")
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
    assert data.query_ids[-1] in caplog.text and f"runs:/{run.info.run_id}/model" in caplog.text


def test_a_crash_mid_run_ends_failed(mlflow_uri, tmp_path, monkeypatch):
    cfg = compose_cfg([f"data.dir={REPO / 'data' / 'queries'}", "learner=sklearn_lr"])

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("streamml.tracking.log_model", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg)
    assert only_run(mlflow_uri, "default").info.status == "FAILED"


def test_a_missing_gpu_fails_before_any_data_or_run(mlflow_uri, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose_cfg([f"data.dir={tmp_path / 'no_such_folder'}"])  # loading it first would raise FileNotFoundError
    with open_dict(cfg):
        cfg.trainer.accelerator = "gpu"
    with pytest.raises(StartupError, match="trainer.accelerator=gpu but torch sees no GPU on this machine; use trainer=cpu"):
        train(cfg)
    assert not (tmp_path / "mlflow.db").exists()


def a_new_scenario(cfg):
    """A runner no code names: only its scenario config does."""
    return {"probe_auc_mean": 0.5, "kind": cfg.scenario.kind}


def test_the_runner_is_the_scenarios_own_else_offline_training_so_a_new_scenario_needs_no_edit_to_train():
    assert compose_cfg([]).run == "streamml.offline.run.run"
    assert compose_cfg(["+experiment=online_personalize"]).run == "streamml.online.simulate.run"
    cfg = compose_cfg(["+experiment=online_replay"])
    assert cfg.run == "streamml.online.replay_run.run" and cfg.data.dir is None  # reads its own log, not query files
    with open_dict(cfg):
        cfg.scenario.run, cfg.scenario.kind = "tests.test_train.a_new_scenario", "new"
    assert train(cfg) == {"probe_auc_mean": 0.5, "kind": "new"}


def run_cli(args, tmp_path, **kwargs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamml.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, **kwargs)


@pytest.mark.slow
def test_cli_on_a_machine_without_gpu_fails_in_one_line_without_a_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli(["trainer=gpu", f"data.dir={REPO / 'data' / 'queries'}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: trainer.accelerator=gpu but torch sees no GPU on this machine; "
        "use trainer=cpu, or trainer.accelerator=auto to use a GPU only when one is visible"]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_run_is_quiet_and_its_log_lands_in_hydras_file(tmp_path):
    result = run_cli([f"data.dir={REPO / 'data' / 'queries'}", "cv.n_folds=2", "cv.n_repeats=1", "trainer.max_epochs=3",
                      f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    for noise in ("Add type hints", "litlogger", "LeafSpec", "GPU available", "TPU available"):
        assert noise not in result.stderr + result.stdout
    assert "cv: 100%" in result.stderr and "final fit: 100%" in result.stderr  # labelled progress bars
    # stderr holds the progress bars and nothing else: no MLflow notice, no third-party warning
    others = [part for part in re.split(r"[\r\n]", result.stderr) if part.strip() and not part.startswith(("cv:", "final fit:"))]
    assert others == []
    log = (tmp_path / "out" / "train.log").read_text()
    assert "6 queries, 348 unique texts" in log and "mean over queries: auc" in log and "wildfires" in log
    last = log.strip().splitlines()[-1]  # the run ends with where it is and its plot
    assert "done: run linear-ranknet" in last and "plots/per_query_auc.png" in last
    plot = last.rsplit(" plot ", 1)[1].removeprefix("file://")
    assert os.path.isfile(os.path.join(tmp_path, plot)), plot
    assert "linear-ranknet[data.dir=…/queries,cv.n_folds=2,cv.n_repeats=1,trainer.max_epochs=3]" in log  # command order


BAD_DATA_RUN = """
import runpy, sys
sys.argv = ["streamml.train", *sys.argv[1:]]
try:
    runpy.run_module("streamml.train", run_name="__main__")
finally:
    print("heavy modules loaded:", sorted(m for m in ("lightning", "mlflow", "sklearn", "streamml.online") if m in sys.modules))
"""


def test_a_bad_data_file_fails_in_one_line_naming_file_and_row_before_the_heavy_imports(tmp_path):
    """The check runs before Lightning, MLflow, sklearn and the simulator are imported (those
    imports are what took 10-14 s); the time itself is measured in the README, not asserted."""
    rows = [{"text": "a", "label": "accepted", "embedding": [0.0] * 384}, {"text": "b", "label": "liked", "embedding": [0.0] * 384}]
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "q.json").write_text(json.dumps(rows))
    result = subprocess.run([sys.executable, "-c", BAD_DATA_RUN, f"data.dir={tmp_path / 'queries'}", f"hydra.run.dir={tmp_path / 'out'}"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'queries' / 'q.json'} row 1 field 'label': unknown label 'liked', "
                                          "expected one of ['accepted', 'rejected']"]
    assert "heavy modules loaded: []" in result.stdout
    assert "Traceback" in (tmp_path / "out" / "train.log").read_text()
    assert not (tmp_path / "mlflow.db").exists()


def test_what_a_run_prints_also_lands_in_its_log_file(tmp_path, capsys):
    """The online benchmark prints its table; train.log must hold it as the console did."""
    from streamml.train import _stdout_to_log

    closed = logging.FileHandler(tmp_path / "earlier.log")  # left behind by an earlier run in this process
    closed.close()
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(closed)
    logging.getLogger().addHandler(handler)
    try:
        with _stdout_to_log():
            print("residual  0.846")
    finally:
        for h in (closed, handler):
            logging.getLogger().removeHandler(h)
            h.close()
    assert capsys.readouterr().out == "residual  0.846\n"
    assert (tmp_path / "train.log").read_text() == "residual  0.846\n"


def test_the_optuna_plugin_without_optuna_is_silent_until_a_search_selects_it(tmp_path):
    """Hydra imports every plugin on every run: without the `search` extra that must not warn."""
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from hydra.core.plugins import Plugins; Plugins.instance()\n"
            "from hydra_plugins.streamml_optuna_sweeper.optuna_sweeper import OptunaSweeper\n"
            "OptunaSweeper('maximize', 1, 1, None, None, None, True, {}, None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "incompatible" not in result.stderr and "Warning" not in result.stderr
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        "ImportError: the Optuna sweeper (hparams_search=...) needs Optuna: pip install -e '.[search]'")


@pytest.mark.slow
def test_four_job_multirun_ends_with_a_sorted_summary_saved_in_the_sweep_folder(tmp_path):
    result = run_cli(["-m", "learner=sklearn_lr", "learner.C=0.001,0.1,1,10", "name=four_jobs", f"data.dir={REPO / 'data' / 'queries'}",
                      "cv.n_folds=2", "cv.n_repeats=1", "final_fit=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["four_jobs"])
    assert len(runs) == 4 and set(runs.status) == {"FINISHED"}
    assert sorted(runs["tags.mlflow.runName"]) == [
        f"sklearn_lr-ranknet[learner.C={c},data.dir=…/queries,cv.n_folds=2,cv.n_repeats=1,final_fit=False]"
        for c in ("0.001", "0.1", "1", "10")]
    by_c = {float(run["params.learner.C"]): run["metrics.auc"] for _, run in runs.iterrows()}
    best_first = sorted(by_c, key=lambda c: -by_c[c])
    summary = result.stdout[result.stdout.index("multirun summary: 4 jobs"):].splitlines()
    assert "every job: learner=sklearn_lr" in summary[0] and summary[1].split() == ["job", "auc", "overrides"]
    for line, c in zip(summary[2:6], best_first):
        job, auc, override = line.split()
        assert override == f"learner.C={c:g}" and float(auc) == pytest.approx(by_c[c], abs=1e-4)
    rows = (tmp_path / "sweep" / "summary.md").read_text().splitlines()[-4:]
    assert [row.split(" | ")[3].strip("` |") for row in rows] == [f"learner.C={c:g}" for c in best_first]
    assert (tmp_path / "sweep" / "summary.csv").read_text().count("\n") == 5


@pytest.mark.slow
def test_linear_ranknet_ties_sklearn_lr_on_real_data(mlflow_uri, shared_queries):
    """The heads tie tuned LR on the shared data (experiments/README.md): never worse by more than the spread over splits.

    One repeat of the 5 folds (not 3): the claim is about the spread over splits, which 5 splits
    show, and it takes a third of the time (126 s of the full suite before)."""
    results = {}
    for overrides in (["+experiment=linear_ranknet"], ["learner=sklearn_lr", "learner.C=100"]):
        cfg = compose_cfg([*overrides, f"data.dir={shared_queries}", "final_fit=false", "cv.n_repeats=1"], tiny=False)
        with open_dict(cfg):
            cfg.trainer.enable_progress_bar = False
        results[overrides[0]] = train(cfg)
    ours, lr = results["+experiment=linear_ranknet"], results["learner=sklearn_lr"]
    assert ours["auc"] >= lr["auc"] - lr["auc_std"], (ours["auc"], lr["auc"], lr["auc_std"])
