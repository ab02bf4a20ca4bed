"""Results files from MLflow: ``python -m streamml.report EXPERIMENT [--out FILE.md]``.

Every table under ``experiments/`` is written here (or by a benchmark script), from the
runs themselves, so no figure is typed by hand. The file names the command, the commits
of the runs it shows and the machine, and a PNG plot sits next to it.

Offline experiments get a leaderboard (one row per run: held-out AUC mean ± std over
splits, and the tuning AUC of nested runs), and, when runs were cross-validated with
``cv.nested=true``, a **nested selection** per family of candidates. A family is an Optuna
study (runs tagged ``optuna_study``, nested under the study's parent run) or, for runs
outside a study, one learner class (a Hydra grid over ``learner.C`` is one family). For
each outer split ``k`` the family's candidate with the best tuning AUC on ``k``'s inner
folds is chosen, and its AUC on ``k``'s outer test rows is reported: the choice never saw
those rows. The residual leak: a sampler such as TPE proposes candidates guided by every
outer split's tuning figure, and the inner folds of split ``j`` include the test rows of
split ``k``, so the *candidates* (not the choice among them) may lean towards fold ``k``'s
test rows. One study per outer split would remove it at K times the cost.

Online experiments (runs with a ``scenario``) get one row per learner of the newest run:
ours under the bare metric name, baselines as ``<metric>.<learner>``, as ``mean ± std`` where
the run logged ``<metric>_std`` (the spread over simulated users or streams); ``--metrics``
may be given more than once for several tables. ``--where`` narrows the runs with an MLflow
filter (e.g. ``"tags.streams = 'test'"``, so tuning runs in the same store are left out).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure registry to close

from streamml.provenance import machine

BASELINES = {"SklearnLR", "RiverStack"}
STUDY_TAG, ROLE_TAG = "optuna_study", "streamml.role"


def load_runs(experiment: str, tracking_uri: str, where: str = "") -> pd.DataFrame:
    """Finished runs of ``experiment`` (and ``where``, an MLflow filter) with a ``family`` and a
    ``baseline`` column, newest first; study parents dropped."""
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise SystemExit(f"no experiment {experiment!r} at {tracking_uri}")
    condition = "attributes.status = 'FINISHED'" + (f" and {where}" if where else "")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=condition,
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise SystemExit(f"no finished runs in experiment {experiment!r} at {tracking_uri}"
                         + (f" matching {where!r}" if where else ""))
    if f"tags.{ROLE_TAG}" in runs:
        runs = runs[runs[f"tags.{ROLE_TAG}"].fillna("") != "study"]
    learner = _short(runs.get("params.learner.head._target_")).fillna(_short(runs.get("params.learner._target_")))
    runs = runs.assign(learner=learner.fillna("?"), baseline=learner.isin(BASELINES))
    study = runs[f"tags.{STUDY_TAG}"] if f"tags.{STUDY_TAG}" in runs else pd.Series(None, index=runs.index, dtype=object)
    runs["family"] = np.where(study.notna(), "study " + study.astype(str), runs["learner"])
    return runs.reset_index(drop=True)


def _short(column: pd.Series | None) -> pd.Series:
    if column is None:
        return pd.Series(dtype=object)
    return column.where(column.isna(), column.astype(str).str.rsplit(".", n=1).str[-1])


def split_matrix(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """(runs, splits) matrix of the per-split metrics ``<prefix>.<k>``, columns sorted by ``k``."""
    cols = sorted((c for c in runs if c.startswith(f"metrics.{prefix}.")), key=lambda c: int(c.rsplit(".", 1)[1]))
    matrix = runs[cols].astype(float)
    matrix.columns = [int(c.rsplit(".", 1)[1]) for c in cols]
    return matrix


def nested_selection(runs: pd.DataFrame) -> pd.DataFrame:
    """Per family and outer split: the candidate with the best tuning AUC there, and its held-out AUC.

    Returns one row per (family, split) with ``run``, ``tuning_auc`` and ``auc``; families
    whose runs were not nested are left out.
    """
    tuning, held_out = split_matrix(runs, "split_tuning_auc"), split_matrix(runs, "split_auc")
    rows = []
    families = list(runs.groupby("family", sort=False))
    for family, part in list(families):  # a study over several learners also counts as one restricted search per learner
        if part["learner"].nunique() > 1:
            families += [(f"{family}: {learner}", sub) for learner, sub in part.groupby("learner")]
    for family, part in families:
        t = tuning.loc[part.index].dropna(axis=0, how="all")
        if t.empty:
            continue
        for k in t.columns:
            best = t[k].idxmax()
            rows.append({"family": family, "split": k, "run": runs.at[best, "tags.mlflow.runName"],
                         "run_id": runs.at[best, "run_id"], "candidates": len(t),
                         "tuning_auc": t.at[best, k], "auc": held_out.at[best, k]})
    return pd.DataFrame(rows)


def _pm(values: pd.Series) -> str:
    return f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values.mean():.4f}"


def leaderboard(runs: pd.DataFrame, top: int = 5) -> str:
    """Markdown: the best ``top`` runs of each family by held-out AUC, ours and baselines together."""
    nested = "metrics.tuning_auc" in runs and runs["metrics.tuning_auc"].notna().any()
    ranked = runs.sort_values("metrics.auc", ascending=False).groupby("family", sort=False).head(top)
    head = ("| run | family | kind | " + ("tuning AUC (inner) | " if nested else "")
            + "held-out AUC (mean ± std over splits) | NDCG@5 | MAP |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for _, r in ranked.iterrows():
        tuning = f"{r['metrics.tuning_auc']:.4f} | " if nested and pd.notna(r.get("metrics.tuning_auc")) else ("– | " if nested else "")
        lines.append(f"| {r['tags.mlflow.runName']} | {r['family']} | {'baseline' if r['baseline'] else 'ours'} | {tuning}"
                     f"{r['metrics.auc']:.4f} ± {r['metrics.auc_std']:.4f} | {r['metrics.ndcg_at_5']:.4f} | {r['metrics.map']:.4f} |")
    shown = runs.groupby("family").size()
    note = ", ".join(f"{f}: {n}" for f, n in shown.items() if n > top)
    return "\n".join(lines) + (f"\n\nBest {top} runs per family shown; runs per family: {note}." if note else "")


def nested_table(runs: pd.DataFrame, chosen: pd.DataFrame, reference: str = "SklearnLR") -> str:
    """Markdown: each family's nested figures, and the paired difference to the reference family."""
    baseline_of = chosen.groupby("family")["run_id"].first().map(runs.set_index("run_id")["baseline"])
    ref_family = next((f for f in chosen.family.unique() if set(runs.learner[runs.run_id.isin(_members(runs, f))]) == {reference}), None)
    ref = chosen[chosen.family == ref_family].set_index("split")["auc"] if ref_family else None
    lines = ["| family | kind | candidates | tuning AUC (inner, chosen) | **held-out AUC (outer, nested)** | "
             f"Δ held-out vs {ref_family or reference} (mean ± std over splits) | Δ > std? "
             "| best trial by mean tuning AUC: tuning / held-out |",
             "|---" * 8 + "|"]
    order = chosen.groupby("family", sort=False)["auc"].mean().sort_values(ascending=False).index
    for family in order:
        part = chosen[chosen.family == family].set_index("split")
        delta, verdict = "–", "–"
        if ref is not None and family != ref_family:
            diff = (part["auc"] - ref.reindex(part.index)).dropna()
            delta = _pm(diff)
            verdict = "yes" if diff.mean() > diff.std() else "no"
        members = runs[runs.run_id.isin(_members(runs, family))]
        best = members.loc[members["metrics.tuning_auc"].idxmax()]
        lines.append(f"| {family} | {'baseline' if baseline_of[family] else 'ours'} | {part['candidates'].iloc[0]} | "
                     f"{_pm(part['tuning_auc'])} | **{_pm(part['auc'])}** | {delta} | {verdict} | "
                     f"{best['tags.mlflow.runName']}: {best['metrics.tuning_auc']:.4f} / {best['metrics.auc']:.4f} |")
    return "\n".join(lines)


def _members(runs: pd.DataFrame, family: str) -> pd.Series:
    """Run ids of a family, or of a ``"<study family>: <learner>"`` sub-family."""
    if family in set(runs.family):
        return runs.run_id[runs.family == family]
    study, learner = family.rsplit(": ", 1)
    return runs.run_id[(runs.family == study) & (runs.learner == learner)]


def plot(runs: pd.DataFrame, chosen: pd.DataFrame, title: str):
    """Held-out AUC per family (nested choice if nested, else each family's best run), splits as dots."""
    if len(chosen):
        groups = {f: part.set_index("split")["auc"] for f, part in chosen.groupby("family", sort=False)}
        tuning = {f: part["tuning_auc"].mean() for f, part in chosen.groupby("family", sort=False)}
    else:
        held_out = split_matrix(runs, "split_auc")
        best = runs.sort_values("metrics.auc", ascending=False).drop_duplicates("family")
        groups = {r.family: held_out.loc[i].dropna() for i, r in best.iterrows()}
        tuning = {}
    order = sorted(groups, key=lambda f: groups[f].mean())
    fig = Figure(figsize=(7.5, 0.55 * len(order) + 1.6))
    ax = fig.subplots()
    for y, family in enumerate(order):
        values = groups[family]
        color = "tab:gray" if runs[runs.run_id.isin(_members(runs, family))]["baseline"].all() else "tab:blue"
        ax.scatter(values, np.full(len(values), y) + np.linspace(-0.15, 0.15, len(values)), s=10, color=color, alpha=0.5)
        ax.errorbar(values.mean(), y, xerr=values.std() if len(values) > 1 else None, fmt="o", color=color, capsize=4, ms=7)
        if family in tuning:
            ax.plot(tuning[family], y, marker="x", color="k", ms=7, ls="")
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel("held-out AUC per outer split (dots), mean ± std" + ("; x = tuning AUC of the choice" if tuning else ""))
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def online_table(runs: pd.DataFrame, tables: list[list[str]] | None, ours: str = "residual") -> str:
    """Online runs: with one run, one table per metric list and one row per learner (``key`` is
    ours, ``key.<learner>`` a baseline's); with several (a sweep), one row per run name (its
    newest run) over the first list (by default every scalar metric and the first one's baselines)."""
    newest = runs.drop_duplicates("tags.mlflow.runName")
    bare = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics.") and "." not in c.removeprefix("metrics."))
    chosen = tables is not None
    tables = tables or [[m for m in bare if not (m.endswith("_std") and m.removesuffix("_std") in bare)]]
    tables = [[m for m in metrics if f"metrics.{m}" in runs] for metrics in tables]
    if len(newest) > 1:
        metrics = tables[0]
        cols = metrics if chosen else metrics + sorted(c.removeprefix("metrics.") for c in runs
                                if c.startswith("metrics.") and c.removeprefix("metrics.").split(".", 1)[0] in metrics[:1]
                                and "." in c.removeprefix("metrics.") and not c.startswith("metrics.curve"))
        lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for _, r in newest.sort_values(f"metrics.{metrics[0]}", ascending=False).iterrows():
            lines.append(f"| {r['tags.mlflow.runName']} | " + " | ".join(f"{r[f'metrics.{c}']:.4f}" for c in cols) + " |")
        return "\n".join(lines)
    run = newest.iloc[0]
    shown = [m for metrics in tables for m in metrics]
    notes = ["mean ± std: the run's `<metric>` and `<metric>_std`, the spread over its simulated users or streams"]
    if any(m.startswith("probe_lift") for m in shown):
        notes.append("`probe_lift` is the paired difference to the head on the same user")
    if any("_gap" in m for m in shown):
        notes.append(f"a `_gap` is {ours} minus that learner, paired on the same user (or stream): its standard "
                     "error is its std over the square root of `users` (`streams`)")
    return (f"Run `{run['run_id']}`, {run['tags.mlflow.runName']}.\n\n"
            + "\n\n".join(_learner_table(run, metrics, ours) for metrics in tables)
            + "\n\n" + "; ".join(notes) + ".")


def _learner_table(run: pd.Series, metrics: list[str], ours: str) -> str:
    """One row per learner of ``run`` that logged any of ``metrics``, ours first."""

    def get(key: str, learner: str) -> float | None:
        value = run.get(f"metrics.{key}" if learner == ours else f"metrics.{key}.{learner}")
        return None if value is None or pd.isna(value) else value

    def cell(metric: str, learner: str) -> str:
        value, std = get(metric, learner), get(f"{metric}_std", learner)
        return "" if value is None else f"{value:.3f}" + ("" if std is None else f" ± {std:.3f}")

    baselines = {c.split(".", 2)[2] for c in run.index if c.startswith("metrics.") and c.count(".") == 2
                 and c.split(".")[1] in metrics and pd.notna(run[c])}
    lines = ["| learner | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for learner in [ours, *sorted(baselines - {ours})]:
        lines.append(f"| {learner} | " + " | ".join(cell(m, learner) for m in metrics) + " |")
    return "\n".join(lines)


SUBGROUP = re.compile(r"^metrics\.(probe_auc|prequential_auc)_at_(\d+)_(.+?)(?:\.(.+))?$")


def online_plot(run: pd.Series, tracking_uri: str, ours: str = "residual") -> Figure | None:
    """AUC against events for one online run, one line per learner: the run's learning curves
    (``curve.<metric>.<learner>``, all users) and, per kind of simulated user, the probe AUC at
    each checkpoint (``probe_auc_at_<c>_<user model>``), so a subgroup that pays shows."""
    client = mlflow.MlflowClient(tracking_uri)
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for key in sorted(k for k in run.index if k.startswith("metrics.curve.") and pd.notna(run[k])):
        metric, learner = key.removeprefix("metrics.curve.").split(".", 1)
        history = client.get_metric_history(run["run_id"], key.removeprefix("metrics."))
        panels.setdefault(f"{metric}, all users", {})[learner] = sorted((m.step, m.value) for m in history)
    for key, value in run.items():
        match = SUBGROUP.match(str(key))
        if match and pd.notna(value) and not match[3].endswith("std"):
            metric, events, group, learner = match[1], int(match[2]), match[3], match[4] or ours
            panels.setdefault(f"{metric}, users: {group}", {}).setdefault(learner, []).append((events, float(value)))
    if not panels:
        return None
    fig = Figure(figsize=(4.5 * len(panels), 3.5))
    for ax, (title, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for learner in sorted(lines, key=lambda name: (name != ours, name)):
            steps, values = zip(*sorted(lines[learner]))
            ax.plot(steps, values, marker="o", ms=3, label=learner, lw=2.5 if learner == ours else 1.2)
        ax.set(title=title, xlabel="events (answers per user)", ylabel=title.split(",")[0])
        ax.grid(alpha=0.3)
    fig.axes[0].legend()
    name = str(run.get("tags.mlflow.runName", ""))  # run names run long: wrapped to the figure's width, not cut
    fig.suptitle(textwrap.fill(name, width=50 * len(panels), break_on_hyphens=True), fontsize=9)
    fig.tight_layout()
    return fig


def _save(fig: Figure, out: Path) -> Path:
    png = out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def store_label(tracking_uri: str) -> str:
    """The store as the results file names it: a path inside the repository, never one outside it."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_absolute():
        return f"`{tracking_uri}`"
    return "the store the runs were logged to (outside the repository)"


def report(experiment: str, out: str | Path, tracking_uri: str, command: str | None = None,
           title: str | None = None, top: int = 5, reference: str = "SklearnLR",
           tables: list[list[str]] | None = None, invocation: str | None = None, where: str = "") -> str:
    """Write ``out`` (Markdown) and its plot, ``out`` with ``.png``; returns the Markdown.

    ``tables``: the metrics of each online table (default: one table of every scalar metric)."""
    out = Path(out)
    mlflow.set_tracking_uri(tracking_uri)
    runs = load_runs(experiment, tracking_uri, where)
    title = title or experiment
    commits = set(runs["tags.git_commit"].dropna()) if "tags.git_commit" in runs else set()
    if any(c.startswith("params.scenario") for c in runs):
        target = runs.get("params.online._target_", pd.Series(dtype=object)).dropna()
        ours = "mixed" if target.str.endswith("MixedLearner").any() else "residual"
        body = online_table(runs, tables, ours=ours)
        fig = online_plot(runs.iloc[0], tracking_uri)  # the newest run
        if fig is not None:
            body += f"\n\n![AUC against events, per kind of user, newest run]({_save(fig, out).name})"
    else:
        chosen = nested_selection(runs)
        parts = []
        if len(chosen):
            parts += ["## Nested CV: chosen on inner folds, reported on outer folds", "",
                      nested_table(runs, chosen, reference), "",
                      "Per outer split, each family's candidate with the best tuning AUC on that split's inner folds "
                      "is scored on the split's held-out rows; ± is the std over outer splits. Δ is paired split by split. "
                      "See `streamml/report.py` for the residual leak through a sampler's guidance.", ""]
        parts += ["## Leaderboard", "", leaderboard(runs, top)]
        parts += ["", f"![held-out AUC per family]({_save(plot(runs, chosen, title), out).name})"]
        body = "\n".join(parts)
    header = [f"# {title}", ""]
    if command:
        header.append(f"- Runs made by: `{command}`")
    header += [f"- Written by: `{invocation or f'python -m streamml.report {experiment} --out {out}'}`"
               f" from `MLFLOW_TRACKING_URI` = {store_label(tracking_uri)}",
               f"- Runs at commit(s): {', '.join(sorted(commits)) or 'unknown'}",
               f"- Machine: {machine()}",
               f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from experiment `{experiment}` ({len(runs)} finished runs)",
               ""]
    text = "\n".join(header) + "\n" + body + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamml.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="MLflow experiment name (the config's `name`)")
    parser.add_argument("--out", help="Markdown file to write (default experiments/EXPERIMENT.md); the plot goes next to it")
    parser.add_argument("--command", help="the command that produced the runs, quoted in the header")
    parser.add_argument("--title")
    parser.add_argument("--top", type=int, default=5, help="runs shown per family in the leaderboard")
    parser.add_argument("--reference", default="SklearnLR", help="learner class the nested table compares against")
    parser.add_argument("--metrics", action="append",
                        help="comma-separated metrics of an online table (default: every scalar one); repeat for more tables")
    parser.add_argument("--where", default="", help="MLflow filter on the runs, e.g. \"tags.streams = 'test'\"")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = args.out or f"experiments/{args.experiment}.md"
    tables = [m.split(",") for m in args.metrics] if args.metrics else None
    print(report(args.experiment, out, args.tracking_uri, args.command, args.title, args.top, args.reference,
                 tables, invocation="python -m streamml.report " + shlex.join(argv), where=args.where))


if __name__ == "__main__":
    main()
