"""Hydra callbacks (``configs/hydra/default.yaml``).

``MultirunSummary``: at the end of ``python -m streamml.train -m ...`` it prints one row per
job, its overrides and its objective, so a sweep's result is readable without opening MLflow.
Hydra builds these for every run, even a failing one, so this module imports nothing heavy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MultirunSummary(Callback):
    """Logs a table of the multirun's jobs: number, status, objective and overrides.

    Overrides shared by every job go in the title, so each row shows what sets it apart.
    Jobs are collected in ``on_job_end``, so the table covers the jobs run in this
    process (Hydra's basic launcher, also under the Optuna sweeper).
    """

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        ok = job_return.status == JobStatus.COMPLETED
        value = job_return._return_value  # the property re-raises a failed job's error
        self.jobs.append(Job(
            num=int(config.hydra.job.get("num", len(self.jobs))),
            overrides=list(job_return.overrides or []),
            objective=float(value) if ok and isinstance(value, (int, float)) else None,
            error=None if ok else f"{type(value).__name__}: {value}",
        ))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.jobs:
            log.info("%s", summary_table(self.jobs, config.get("objective", "objective"), str(config.hydra.sweep.dir)))


@dataclass
class Job:
    num: int
    overrides: list[str]
    objective: float | None
    error: str | None = None


def summary_table(jobs: list[Job], objective: str, sweep_dir: str = "") -> str:
    """One line per job: ``#num  objective  overrides`` (or the error), in job order."""
    common = [o for o in jobs[0].overrides if all(o in job.overrides for job in jobs)] if len(jobs) > 1 else []
    header = f"multirun summary: {len(jobs)} jobs" + (f" in {sweep_dir}" if sweep_dir else "")
    if common:
        header += f"; every job: {' '.join(common)}"
    width = max(len(objective), 8)
    lines = [header, f"{'job':>4}  {objective:>{width}}  overrides"]
    for job in jobs:
        value = f"{job.objective:.4f}" if job.objective is not None else "failed"
        own = " ".join(o for o in job.overrides if o not in common) or "(none)"
        lines.append(f"{job.num:>4}  {value:>{width}}  {own}" + (f"  [{job.error}]" if job.error else ""))
    return "\n".join(lines)
