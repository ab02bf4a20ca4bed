"""Hydra callbacks (``configs/hydra/default.yaml``).

``MultirunSummary``: at the end of ``python -m streamml.train -m ...`` it prints one row per
job, best objective first, and saves the table as ``summary.csv`` and ``summary.md`` in the
sweep folder, so a sweep's result is readable without opening MLflow.

Jobs may run in other processes (the joblib launcher of the Optuna searches, a cluster
launcher), where this process never sees their ``on_job_end``. So each job writes its row
to ``job.json`` in its own output folder, and the table is built from those files.
Hydra builds these callbacks for every run, even a failing one, so this module imports
nothing heavy.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
ROW_FILE = "job.json"


@dataclass
class Job:
    num: int
    overrides: list[str]
    objective: float | None
    error: str | None = None


class MultirunSummary(Callback):
    """Logs and saves a table of the multirun's jobs: rank, number, objective and overrides.

    Rows are sorted by the objective, best first, in the sweeper's ``direction``
    (``maximize`` unless the sweeper says otherwise: every objective here is an AUC or a
    rate); failed jobs come last. Overrides shared by every job go in the title.
    """

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.jobs = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        ok = job_return.status == JobStatus.COMPLETED
        value = job_return._return_value  # the property re-raises a failed job's error
        objective = float(value) if ok and isinstance(value, (int, float)) else None
        job = Job(
            num=int(config.hydra.job.get("num", len(self.jobs))),
            overrides=list(job_return.overrides or []),
            objective=objective if objective is None or math.isfinite(objective) else None,
            error=None if ok else f"{type(value).__name__}: {value}",
        )
        self.jobs.append(job)
        output_dir = config.hydra.get("runtime", {}).get("output_dir")
        if output_dir and "MULTIRUN" in str(config.hydra.get("mode")):
            Path(output_dir, ROW_FILE).write_text(json.dumps(asdict(job)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = {job.num: job for job in self.jobs}
        for path in sweep_dir.rglob(ROW_FILE) if sweep_dir.is_dir() else []:  # jobs run in other processes
            row = json.loads(path.read_text())
            jobs[row["num"]] = Job(**row)
        if not jobs:
            return
        objective = str(config.get("objective", "objective"))
        sweeper = config.hydra.get("sweeper") or {}
        ranked = sort_jobs(list(jobs.values()), maximize=sweeper.get("direction", "maximize") != "minimize")
        log.info("%s", summary_table(ranked, objective, str(sweep_dir)))
        if sweep_dir.is_dir():
            write_csv(ranked, objective, sweep_dir / "summary.csv")
            (sweep_dir / "summary.md").write_text(summary_markdown(ranked, objective))
            log.info("saved %s and %s", sweep_dir / "summary.csv", sweep_dir / "summary.md")


def sort_jobs(jobs: list[Job], maximize: bool = True) -> list[Job]:
    """Best objective first; ties and failures in job order, failures last."""
    sign = -1.0 if maximize else 1.0
    return sorted(jobs, key=lambda j: (j.objective is None, sign * (j.objective or 0.0), j.num))


def _common(jobs: list[Job]) -> list[str]:
    return [o for o in jobs[0].overrides if all(o in job.overrides for job in jobs)] if len(jobs) > 1 else []


def summary_table(jobs: list[Job], objective: str, sweep_dir: str = "") -> str:
    """One line per job, in the given order: ``#num  objective  overrides`` (or the error)."""
    common = _common(jobs)
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


def summary_markdown(jobs: list[Job], objective: str) -> str:
    """The same table in Markdown, with a rank column."""
    common = _common(jobs)
    lines = [f"# Multirun summary: {len(jobs)} jobs, sorted by `{objective}`", ""]
    if common:
        lines += [f"Every job: `{' '.join(common)}`", ""]
    lines += [f"| rank | job | {objective} | overrides |", "|---|---|---|---|"]
    for rank, job in enumerate(jobs, 1):
        value = f"{job.objective:.4f}" if job.objective is not None else f"failed: {job.error or 'no number'}"
        own = " ".join(o for o in job.overrides if o not in common) or "(none)"
        lines.append(f"| {rank} | {job.num} | {value} | `{own}` |")
    return "\n".join(lines) + "\n"


def write_csv(jobs: list[Job], objective: str, path: Path) -> None:
    """One row per job: rank, job, the objective (empty when failed), the error, and one column
    per overridden key, so the table loads straight into pandas or a spreadsheet."""
    keys = list(dict.fromkeys(o.split("=", 1)[0] for job in jobs for o in job.overrides))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "job", objective, "error", *keys])
        for rank, job in enumerate(jobs, 1):
            values = dict(o.split("=", 1) if "=" in o else (o, "") for o in job.overrides)
            writer.writerow([rank, job.num, "" if job.objective is None else job.objective, job.error or "",
                             *(values.get(k, "") for k in keys)])
