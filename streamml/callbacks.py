"""What a run shows while it runs: a labelled progress bar per fit, a table after a multirun.

``EpochProgress`` replaces Lightning's per-batch bar (with full batches, one step an epoch)
by one bar over epochs, named for what the fit is for ("cv", "final fit").
``MultirunSummary`` is a Hydra callback (``configs/hydra/default.yaml``): at the end of
``python -m streamml.train -m ...`` it prints one row per job, its overrides and its
objective, so a sweep's result is readable without opening MLflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class EpochProgress(ProgressBar):
    """A tqdm bar over the epochs of one fit, labelled, with the last ``train_loss``."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar, self._enabled = label, None, True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self.bar = tqdm(total=total, desc=self.label, unit="epoch", dynamic_ncols=True,
                        disable=not (self._enabled and trainer.is_global_zero))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.bar.set_postfix(train_loss=f"{float(loss):.4f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.bar.close()


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
