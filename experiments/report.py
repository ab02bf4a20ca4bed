"""Write a results file from the MLflow runs of one experiment, so no figure is typed by hand.

    python experiments/report.py sweep_learners --command "python -m streamml.train -m ..." \
        --out experiments/sweep_learners.md [--tracking-uri sqlite:///mlflow.db]

The table has one row per run (newest run per run name), or with ``--by-learner`` one
row per learner of the newest run (``mean ± std`` where the run logged ``<metric>_std``),
the metrics given by ``--metrics``, and a footer with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import datetime, timezone

import mlflow


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import numpy
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, mlflow {mlflow.__version__}")


def table(experiment: str, metrics: list[str], tracking_uri: str, where: str = "") -> tuple[str, set[str]]:
    mlflow.set_tracking_uri(tracking_uri)
    condition = "attributes.status = 'FINISHED'" + (f" and {where}" if where else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=condition,
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise SystemExit(f"no finished runs in experiment {experiment!r} at {tracking_uri}")
    runs = runs.drop_duplicates("tags.mlflow.runName")
    cols = [f"metrics.{m}" for m in metrics if f"metrics.{m}" in runs]
    runs = runs.sort_values(cols[0], ascending=False)
    lines = ["| run | " + " | ".join(c.removeprefix("metrics.") for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for _, run in runs.iterrows():
        lines.append(f"| {run['tags.mlflow.runName']} | " + " | ".join(f"{run[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines), set(runs["tags.git_commit"].dropna())


def learner_table(experiment: str, metrics: list[str], tracking_uri: str, where: str = "",
                  ours: str = "residual") -> tuple[str, set[str]]:
    """The newest finished run, one row per learner: ``key`` is ours, ``key.<learner>`` a baseline's."""
    mlflow.set_tracking_uri(tracking_uri)
    condition = "attributes.status = 'FINISHED'" + (f" and {where}" if where else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=condition,
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        raise SystemExit(f"no finished runs in experiment {experiment!r} at {tracking_uri}")
    logged = runs[0].data.metrics
    learners = [ours] + sorted({k.split(".", 1)[1] for k in logged if "." in k and k.split(".", 1)[0] in metrics} - {ours})
    cols = [m for m in metrics if m in logged]

    def cell(metric: str, learner: str) -> str:
        """``mean ± std`` when the run logged ``<metric>_std`` (the spread over users or streams)."""
        get = lambda m: logged.get(m if learner == ours else f"{m}.{learner}")  # noqa: E731
        value, std = get(metric), get(f"{metric}_std")
        if value is None:
            return ""
        return f"{value:.3f}" + ("" if std is None else f" ± {std:.3f}")

    lines = ["| learner | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for learner in learners:
        lines.append(f"| {learner} | " + " | ".join(cell(m, learner) for m in cols) + " |")
    header = f"Run `{runs[0].info.run_id}`, {runs[0].data.tags.get('mlflow.runName', '')}.\n\n"
    return header + "\n".join(lines), {runs[0].data.tags.get("git_commit", "unknown")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--command", required=True, help="the command that produced the runs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", default="auc,auc_std,ndcg_at_5,ndcg_at_10,map,precision_at_5")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--title", default=None)
    parser.add_argument("--by-learner", action="store_true", help="rows = learners of the newest run (online experiments)")
    parser.add_argument("--where", default="", help="extra MLflow filter, e.g. \"tags.streams = 'test'\"")
    args = parser.parse_args()
    make = learner_table if args.by_learner else table
    body, commits = make(args.experiment, args.metrics.split(","), args.tracking_uri, args.where)
    commit = ", ".join(sorted(commits)) or "unknown"
    with open(args.out, "w") as out:
        out.write(f"# {args.title or args.experiment}\n\n{body}\n\n")
        out.write(f"- Command: `{args.command}`\n- Machine: {machine()}\n")
        out.write(f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from runs at commit {commit}\n")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
