"""The Optuna sweeper plugin: grammar -> distributions, conditional parameters, failed jobs,
and whole studies run as `-m` multiruns in subprocesses (a toy app, then streamml.train)."""

import math
import os
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from conftest import REPO, write_queries
from hydra_plugins.streamml_optuna_sweeper.optuna_sweeper import (
    check_conditions,
    distribution,
    safe_url,
    search_space,
    suggest,
    trial_value,
)


def parse(*lines):
    return OverridesParser.create().parse_overrides(list(lines))


@pytest.mark.parametrize(
    "line, expected",
    [
        ("learner=choice(linear, mlp)", CategoricalDistribution(["linear", "mlp"])),
        ("loss=ranknet,margin,bce", CategoricalDistribution(["ranknet", "margin", "bce"])),
        ("x=choice(1, 2.5, true)", CategoricalDistribution([1, 2.5, True])),
        ("lr=interval(0.001, 0.3)", FloatDistribution(0.001, 0.3)),
        ("lr=interval(1, 3.0)", FloatDistribution(1.0, 3.0)),
        ("epochs=int(interval(30, 300))", IntDistribution(30, 300)),
        ("wd=tag(log, interval(0.001, 10.0))", FloatDistribution(0.001, 10.0, log=True)),
        ("hidden=tag(log, int(interval(4, 64)))", IntDistribution(4, 64, log=True)),
        ("k=range(1, 5)", IntDistribution(1, 4)),
        ("k=range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("p=range(0.0, 1.0, 0.25)", FloatDistribution(0.0, 0.75, step=0.25)),
    ],
)
def test_grammar_maps_to_optuna_distributions(line, expected):
    assert distribution(parse(line)[0]) == expected


def test_a_plain_value_is_not_a_distribution():
    with pytest.raises(ValueError, match="'lr=0.1' is not a sweep"):
        distribution(parse("lr=0.1")[0])


def test_search_space_keeps_fixed_overrides_for_every_trial():
    space, fixed = search_space(parse("learner=choice(linear, mlp)", "data.dir=/tmp/q", "+extra=1", "lr=interval(0.1, 1.0)"))
    assert list(space) == ["learner", "lr"]
    assert fixed == ["data.dir=/tmp/q", "+extra=1"]


def test_conditional_parameter_is_sampled_only_when_its_condition_holds():
    space = {"learner": CategoricalDistribution(["linear", "mlp"]), "hidden": IntDistribution(4, 64, log=True)}
    conditions = {"hidden": {"learner": ["mlp"]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, space, conditions)
        assert ("hidden" in params) == (params["learner"] == "mlp")
        assert trial.params == params
        study.tell(trial, 0.0)
        seen.add(params["learner"])
    assert seen == {"linear", "mlp"}


@pytest.mark.parametrize(
    "conditions, message",
    [
        ({"width": {"learner": ["mlp"]}}, "names 'width', which is not a searched parameter"),
        ({"hidden": {"loss": ["bce"]}}, "depends on 'loss', which must be a searched parameter listed before it"),
        ({"learner": {"hidden": [8]}}, "depends on 'hidden', which must be a searched parameter listed before it"),
    ],
)
def test_bad_conditions_name_the_parameter(conditions, message):
    space = {"learner": CategoricalDistribution(["linear", "mlp"]), "hidden": IntDistribution(4, 64)}
    with pytest.raises(ValueError, match=message):
        check_conditions(space, conditions)


def _job(value=None, status=JobStatus.COMPLETED):
    job = JobReturn()
    job.return_value, job.status = value, status
    return job


def test_failed_or_junk_job_returns_give_no_value():
    assert trial_value(_job(0.75)) == 0.75
    assert trial_value(_job(1)) == 1.0
    assert trial_value(_job(RuntimeError("boom"), JobStatus.FAILED)) is None
    assert trial_value(_job(float("nan"))) is None
    assert trial_value(_job(None)) is None
    assert trial_value(_job("abc")) is None


def test_storage_password_is_masked():
    assert safe_url("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert "secret" not in safe_url("postgresql://user:secret@db:5432/optuna")


TOY_APP = '''
import math
import hydra

@hydra.main(version_base="1.3", config_path="conf", config_name="toy")
def main(cfg):
    if cfg.x > 4.0:
        raise ValueError(f"x={cfg.x} is out of range")
    if cfg.kind == "nan":
        return float("nan")
    return -(cfg.x - 2.0) ** 2

if __name__ == "__main__":
    main()
'''

TOY_CONFIG = '''
defaults:
  - override hydra/sweeper: optuna
  - _self_
x: 0.0
kind: ok
hydra:
  sweeper:
    direction: maximize
    n_trials: 12
    n_jobs: 3
    study_name: toy
    sampler:
      seed: 1
      n_startup_trials: 12
    params:
      x: interval(0.0, 6.0)
      kind: choice(ok, nan)
'''


def run_sweep(args, cwd, env_extra=None, timeout=900):
    """Run python ARGS in cwd (a temp dir: MLflow puts artifacts in ./mlruns) and check it succeeds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.mark.slow
def test_toy_study_survives_failing_trials(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "toy.yaml").write_text(textwrap.dedent(TOY_CONFIG))
    (tmp_path / "app.py").write_text(textwrap.dedent(TOY_APP))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_sweep(["app.py", "-m", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path)

    trials = optuna.load_study(study_name="toy", storage=storage).trials
    assert [t.number for t in trials] == list(range(12))
    for t in trials:
        expected_fail = t.params["x"] > 4.0 or t.params["kind"] == "nan"
        assert t.state == (optuna.trial.TrialState.FAIL if expected_fail else optuna.trial.TrialState.COMPLETE), t
        if not expected_fail:
            assert math.isclose(t.value, -((t.params["x"] - 2.0) ** 2))
    assert any(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert "best_value" in (tmp_path / "multirun" / "optimization_results.yaml").read_text()

    # The same command again adds trials to the same study instead of starting a new one.
    run_sweep(["app.py", "-m", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2",
               f"hydra.sweep.dir={tmp_path / 'multirun2'}"], tmp_path)
    assert len(optuna.load_study(study_name="toy", storage=storage).trials) == 14


def search_records(tracking_uri, experiment, study):
    """(parent runs, trial runs) of a study in MLflow."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], f"tags.optuna_study = '{study}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("streamml.role") == "study"]
    trials = [r for r in runs if "optuna_trial" in r.data.tags]
    return parents, trials


def tiny_search_args(query_dir, storage, sweep_dir, n_trials, study="tiny"):
    return ["-m", "streamml.train", "-m", "hparams_search=offline_heads", f"data.dir={query_dir}",
            "cv.n_folds=2", "cv.inner_folds=2", "trainer.max_epochs=int(interval(2, 4))", f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}", f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow
def test_offline_search_records_every_trial_under_the_study_run(tmp_path):
    query_dir = write_queries(tmp_path / "queries")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sweep(tiny_search_args(query_dir, storage, tmp_path / "multirun", n_trials=4), tmp_path,
                    {"MLFLOW_TRACKING_URI": tracking})

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    # the trials ran in joblib workers; the sweep still ends with their table, best first, saved
    assert "multirun summary: 4 jobs" in out.stdout
    rows = (tmp_path / "multirun" / "summary.md").read_text().splitlines()[-4:]
    values = [float(row.split(" | ")[2]) for row in rows]
    assert values == sorted(values, reverse=True) == pytest.approx(sorted((t.value for t in study.trials), reverse=True), abs=1e-4)
    assert [int(row.split(" | ")[1]) for row in rows][0] == study.best_trial.number
    parents, trials = search_records(tracking, "offline_search", "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_value"] == pytest.approx(study.best_value)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    for run in trials:
        trial = study.trials[int(run.data.tags["optuna_trial"])]
        assert run.data.metrics["tuning_auc"] == pytest.approx(trial.value)  # chosen on inner folds
        assert "auc" in run.data.metrics  # the outer folds' figure, for the report only
        assert run.data.params["learner._target_"] == "streamml.offline.module.HeadLearner"
        assert int(run.data.params["trainer.max_epochs"]) == trial.params["trainer.max_epochs"]
        assert ("learner.head.hidden" in trial.params) == (trial.params["learner"] == "mlp")
        assert ("learner.head.rank" in trial.params) == (trial.params["learner"] == "multitask")


@pytest.mark.slow
def test_online_search_tunes_on_the_tune_streams(tmp_path):
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_sweep(["-m", "streamml.train", "-m", "hparams_search=online_residual", f"data.dir={REPO / 'data' / 'queries'}",
               "trainer.max_epochs=5", "scenario.users={flip_cluster: 1}", "scenario.n_rounds=2",
               "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
              tmp_path, {"MLFLOW_TRACKING_URI": tracking})

    study = optuna.load_study(study_name="online_residual", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    parents, trials = search_records(tracking, "search_online_residual", "online_residual")
    assert len(parents) == 1 and len(trials) == 2
    for run in trials:
        trial = study.trials[int(run.data.tags["optuna_trial"])]
        assert run.data.metrics["probe_auc_mean"] == pytest.approx(trial.value)
        assert run.data.params["scenario.streams"] == "tune"
        assert ("rule.prior_var" in trial.params) == (trial.params["rule"] in ("laplace", "window"))
        assert ("rule.head_var" in trial.params) == (trial.params["rule"] == "window")
        assert ("rule.lr" in trial.params) == (trial.params["rule"] in ("pairwise", "pointwise"))
