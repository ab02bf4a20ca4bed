"""trainer=ddp: 2 CPU processes (gloo) train the same heads as 1 and log the same metrics.

Under DDP each process trains the groups ``g % 2 == rank`` on full batches, so every pair of a
group sits on one process. A head's gradient after the all-reduce is then the one-process
gradient times a constant per process (the pair count of the shard over the total, halved by
the average); Adam divides each parameter's step by its own gradient scale, so the steps agree
up to Adam's epsilon (1e-8, against gradients ~1e-3) and float rounding. AUC, NDCG and MAP
depend on score order only, so they agree unless two scores tie to ~1e-6: 1e-4 is a wide margin
(the measured difference is 0).
"""

import os
import subprocess
import sys

import mlflow
import pytest

from conftest import REPO
from streamml.tracking import use_experiment

# A spawned gloo worker can abort at exit ("terminate called without an active exception",
# SIGABRT) after its fit has finished: an upstream race of ddp_spawn with several fits in one
# process (Lightning-AI/pytorch-lightning#12439, #20620). It hit one CI run of this test in
# about ten; such a run is tried once more, and only for that signature.
UPSTREAM_ABORT = "terminated with signal SIGABRT"


def _start(trainer, uri, tmp_path):
    cmd = [sys.executable, "-m", "streamml.train", f"trainer={trainer}", "name=ddp", f"logger.run_name={trainer}",
           f"data.dir={REPO / 'data' / 'queries'}", "cv.n_folds=2", "cv.n_repeats=1", "trainer.max_epochs=30",
           "final_fit=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / trainer}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri})


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    use_experiment("ddp")  # the store and the experiment exist before the two runs race to make them
    procs = {trainer: _start(trainer, uri, tmp_path) for trainer in ("cpu", "ddp")}  # at once: the imports overlap
    aborted = 0
    try:
        for trainer in ("cpu", "ddp"):
            stdout, stderr = procs[trainer].communicate(timeout=600)
            if trainer == "ddp" and procs[trainer].returncode != 0 and UPSTREAM_ABORT in stderr and not aborted:
                aborted = 1
                procs[trainer] = _start(trainer, uri, tmp_path)
                stdout, stderr = procs[trainer].communicate(timeout=600)
            assert procs[trainer].returncode == 0, stderr[-3000:]
            if trainer == "ddp":
                assert "Starting with 2 processes" in stderr + stdout
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    runs = mlflow.search_runs(experiment_names=["ddp"])
    assert (runs.status != "FINISHED").sum() == aborted  # an aborted attempt leaves its run FAILED, nothing else
    runs = runs[runs.status == "FINISHED"].set_index("tags.mlflow.runName")
    assert sorted(runs.index) == ["cpu", "ddp"]  # no stray run per process
    assert runs.loc["ddp", "params.trainer.strategy"] == "ddp_spawn"
    metrics = [c for c in runs if c.startswith("metrics.") and "train_loss" not in c]
    assert "metrics.auc" in metrics and "metrics.split_auc.1" in metrics
    for m in metrics:
        assert runs.loc["ddp", m] == pytest.approx(runs.loc["cpu", m], abs=1e-4), m
    history = mlflow.MlflowClient(uri).get_metric_history(runs.loc["ddp", "run_id"], "cv_train_loss")
    assert len(history) == 30  # rank 0 logs each epoch once, into the parent's run
