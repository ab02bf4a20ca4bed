"""streamml.callbacks: the multirun summary table."""

import logging
import numpy as np
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from streamml.callbacks import Job, MultirunSummary, summary_table


def job_return(overrides, status=JobStatus.COMPLETED, value=0.9):
    return JobReturn(overrides=overrides, status=status, _return_value=value)


def test_summary_puts_shared_overrides_in_the_title_and_one_row_per_job(caplog):
    summary = MultirunSummary()
    config = lambda num: OmegaConf.create({"objective": "auc", "hydra": {"job": {"num": num}, "sweep": {"dir": "multirun/x"}}})
    summary.on_multirun_start(config(0))
    summary.on_job_end(config(0), job_return(["learner=linear", "cv.n_folds=2"], value=0.97512))
    summary.on_job_end(config(1), job_return(["learner=mlp", "cv.n_folds=2"], status=JobStatus.FAILED, value=ValueError("bad lr")))
    summary.on_job_end(config(2), job_return(["learner=sklearn_lr", "cv.n_folds=2"], value=np.float64(0.5)))
    with caplog.at_level(logging.INFO, logger="streamml.callbacks"):
        summary.on_multirun_end(config(0))
    assert caplog.messages[-1].splitlines() == [
        "multirun summary: 3 jobs in multirun/x; every job: cv.n_folds=2",
        " job       auc  overrides",
        "   0    0.9751  learner=linear",
        "   1    failed  learner=mlp  [ValueError: bad lr]",
        "   2    0.5000  learner=sklearn_lr",
    ]


def test_a_single_job_keeps_its_overrides_and_no_jobs_print_nothing(caplog):
    assert summary_table([Job(0, [], 0.5)], "prequential_auc").splitlines()[1:] == [
        " job  prequential_auc  overrides", "   0           0.5000  (none)"]
    with caplog.at_level(logging.INFO, logger="streamml.callbacks"):
        MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "x"}}}))
    assert caplog.messages == []
