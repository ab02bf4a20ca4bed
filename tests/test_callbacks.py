"""streamml.callbacks: the multirun summary, sorted by the objective and saved in the sweep folder,
also when the jobs ran in other processes (joblib launcher, Optuna searches)."""

import csv
import logging

import numpy as np
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from streamml.callbacks import Job, MultirunSummary, sort_jobs, summary_table


def job_return(overrides, status=JobStatus.COMPLETED, value=0.9):
    return JobReturn(overrides=overrides, status=status, _return_value=value)


def config(sweep_dir, num=0, direction=None, mode="RunMode.MULTIRUN"):
    hydra = {"job": {"num": num}, "sweep": {"dir": str(sweep_dir)}, "mode": mode,
             "runtime": {"output_dir": str(sweep_dir / str(num))}}
    if direction:
        hydra["sweeper"] = {"direction": direction}
    return OmegaConf.create({"objective": "auc", "hydra": hydra})


def run_jobs(sweep_dir, results, direction=None):
    """Each job's on_job_end in its own callback instance, as in a launcher's worker process;
    returns the instance of the sweep process, which saw none of them."""
    for num, (overrides, status, value) in enumerate(results):
        (sweep_dir / str(num)).mkdir(parents=True)
        MultirunSummary().on_job_end(config(sweep_dir, num, direction), job_return(overrides, status, value))
    parent = MultirunSummary()
    parent.on_multirun_start(config(sweep_dir, direction=direction))
    return parent


RESULTS = [
    (["learner=linear", "cv.n_folds=2"], JobStatus.COMPLETED, 0.5),
    (["learner=mlp", "cv.n_folds=2"], JobStatus.FAILED, ValueError("bad lr")),
    (["learner=sklearn_lr", "cv.n_folds=2"], JobStatus.COMPLETED, np.float64(0.97512)),
    (["learner=river_stack", "cv.n_folds=2"], JobStatus.COMPLETED, 0.75),
]


def test_jobs_from_other_processes_are_sorted_best_first_printed_and_saved(tmp_path, caplog):
    parent = run_jobs(tmp_path, RESULTS)
    with caplog.at_level(logging.INFO, logger="streamml.callbacks"):
        parent.on_multirun_end(config(tmp_path))
    table = next(m for m in caplog.messages if m.startswith("multirun summary"))
    assert table.splitlines() == [
        f"multirun summary: 4 jobs in {tmp_path}; every job: cv.n_folds=2",
        " job       auc  overrides",
        "   2    0.9751  learner=sklearn_lr",
        "   3    0.7500  learner=river_stack",
        "   0    0.5000  learner=linear",
        "   1    failed  learner=mlp  [ValueError: bad lr]",
    ]
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "# Multirun summary: 4 jobs, sorted by `auc`" and "Every job: `cv.n_folds=2`" in md
    assert md[-4:] == ["| 1 | 2 | 0.9751 | `learner=sklearn_lr` |", "| 2 | 3 | 0.7500 | `learner=river_stack` |",
                       "| 3 | 0 | 0.5000 | `learner=linear` |", "| 4 | 1 | failed: ValueError: bad lr | `learner=mlp` |"]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["rank"], r["job"], r["learner"], r["cv.n_folds"]) for r in rows] == [
        ("1", "2", "sklearn_lr", "2"), ("2", "3", "river_stack", "2"), ("3", "0", "linear", "2"), ("4", "1", "mlp", "2")]
    assert float(rows[0]["auc"]) == 0.97512 and rows[3]["auc"] == "" and rows[3]["error"] == "ValueError: bad lr"


def test_a_minimising_sweeper_puts_the_lowest_first(tmp_path):
    parent = run_jobs(tmp_path, RESULTS, direction="minimize")
    parent.on_multirun_end(config(tmp_path, direction="minimize"))
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "3", "2", "1"]


def test_a_single_run_writes_no_row_file_and_no_jobs_print_nothing(tmp_path, caplog):
    (tmp_path / "0").mkdir()
    MultirunSummary().on_job_end(config(tmp_path, mode="RunMode.RUN"), job_return([]))
    assert list(tmp_path.rglob("*.json")) == []
    with caplog.at_level(logging.INFO, logger="streamml.callbacks"):
        MultirunSummary().on_multirun_end(config(tmp_path))
    assert caplog.messages == [] and not (tmp_path / "summary.md").exists()


def test_a_single_job_keeps_its_overrides_and_failures_sort_last():
    assert summary_table([Job(0, [], 0.5)], "prequential_auc").splitlines()[1:] == [
        " job  prequential_auc  overrides", "   0           0.5000  (none)"]
    assert [j.num for j in sort_jobs([Job(0, [], None), Job(1, [], 0.1), Job(2, [], 0.1), Job(3, [], 0.2)])] == [3, 1, 2, 0]
