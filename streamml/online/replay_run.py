"""``scenario=replay``: every online learner replayed on real logged feedback, in one run.

``python -m streamml.train +experiment=online_replay`` reads the log (MovieLens 100k by
default), splits its users, trains the head on the population's feedback through the
configured offline learner (``cfg.learner``), builds ours (``cfg.online``) and every
``cfg.baselines`` learner over the catalog, lets each that has ``fit_population`` fit the
population's events, replays the reported users (``scenario.streams``: ``tune`` or ``test``)
and, with ``scenario.control``, the same keys with labels shuffled. It logs everything to
MLflow and writes ``replay.md`` (the tables, with the command, commit and machine) to the
run's output folder; ``experiments/online_replay.md`` is that file for the test users.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pandas as pd

from streamml.online import replay as R

log = logging.getLogger("streamml.replay")
OURS = "mixed"


def load_events(sc) -> pd.DataFrame:
    """The scenario's logged events: MovieLens (``source=movielens``), a log file (``source=log``) or
    the service's exported log (``source=export``, texts from ``scenario.catalog``)."""
    if sc.source == "movielens":
        return R.read_movielens(sc.path, sc.n_genres, sc.accept_at)
    if sc.source == "log":
        return R.read_log(sc.path)
    if sc.source == "export":
        return R.read_export(sc.path, sc.get("catalog"))
    raise ValueError(f"scenario.source must be movielens, log or export, got {sc.source!r}")


def _head_scores(cfg, catalog: R.Catalog, population: pd.DataFrame) -> np.ndarray:
    from hydra.utils import instantiate

    ids, y = R.head_labels(population, catalog)
    q_code = pd.Categorical(catalog.item_query).codes.astype(np.int64)
    head = instantiate(cfg.learner)
    head.fit(catalog.X[ids], y, q_code[ids])
    return np.asarray(head.score_rows(catalog.X, q_code), np.float64)


def _learners(cfg, catalog: R.Catalog, head: np.ndarray, population: pd.DataFrame) -> dict:
    from hydra.utils import instantiate

    specs = {OURS: cfg.online, **(cfg.get("baselines") or {})}
    pop = population.assign(item=[catalog.index[(q, i)] for q, i in zip(population["query"], population["item"])])
    pop = pop.sort_values(["time", "user", "item"], kind="stable")
    learners = {}
    for name, spec in specs.items():
        learner = instantiate(spec)(items=catalog.X, item_query=catalog.item_query, head_scores=head)
        if hasattr(learner, "fit_population"):
            learner = learner.fit_population(pop[["user", "query", "item", "label", "time"]])
        learners[name] = learner
    return learners


def _table(summary: pd.DataFrame, value: str, group: str) -> str:
    part = summary[summary.group == group]
    lines = ["| learner | " + " | ".join(f"@{c}" for c in sorted(part.events.unique())) + " |",
             "|---" * (1 + part.events.nunique()) + "|"]
    for name, rows in part.groupby("learner", sort=False):
        rows = rows.set_index("events").sort_index()
        se = "se" if value == "probe_auc" else "lift_se"
        lines.append(f"| {name} | " + " | ".join(f"{r[value]:+.4f} ± {r[se]:.4f}" if value == "lift" else
                                                    f"{r[value]:.4f} ± {r[se]:.4f}" for _, r in rows.iterrows()) + " |")
    return "\n".join(lines)


def markdown(summary: pd.DataFrame, control: pd.DataFrame | None, header: list[str]) -> str:
    """The results file: probe AUC, the paired lift over the head, per subgroup, and the control."""
    first = summary[(summary.group == "all") & (summary.learner == OURS)].set_index("events")
    keys = ", ".join(f"@{c}: {int(r.n)} keys of {int(r.users)} users" for c, r in first.iterrows())
    parts = [*header, "", f"Keys per checkpoint ({keys}); ± is the standard error clustered by user.", "",
             "## Probe AUC, all users", "", _table(summary, "probe_auc", "all"), "",
             "## Paired difference to the head (learner minus head_only), all users", "", _table(summary, "lift", "all")]
    for group, words in (("head_good", "the head serves well"), ("head_bad", "the head serves badly")):
        parts += ["", f"## Paired difference to the head, users {words}", "",
                  f"(`{group}`: the head's AUC on the key's stream events at or {'above' if group == 'head_good' else 'below'} "
                  "its median over the keys)", "", _table(summary, "lift", group)]
    if control is not None:
        parts += ["", "## Control: labels shuffled within each key (every learner should sit at 0.5)", "",
                  _table(control, "probe_auc", "all")]
    return "\n".join(parts) + "\n"


def run(cfg) -> dict[str, float]:
    """Run the replay scenario (module doc); returns ours under bare keys, baselines as ``<key>.<name>``."""
    from hydra.core.hydra_config import HydraConfig

    from streamml import tracking
    from streamml.report import machine

    sc = cfg.scenario
    events = load_events(sc)
    catalog = R.build_catalog(events, cache_dir=sc.get("cache_dir"))
    split = R.split_users(events.user.unique(), cfg.seed, sc.population, sc.tuning)
    population = events[events.user.astype(str).isin(split["population"])]
    users = split["tuning" if sc.streams == "tune" else "test"]
    keys = R.make_keys(events, catalog, users, sc.min_events, sc.probe_fraction)
    if not keys:
        raise ValueError(f"no key of the {sc.streams} users has {sc.min_events} events and both labels in its probe")
    log.info(f"replay of {sc.source} {sc.path}: {len(events)} events, {len(catalog.items)} items, "
             f"{len(split['population'])} population users; {len(keys)} keys of {len({k.user for k in keys})} {sc.streams} users")
    head = _head_scores(cfg, catalog, population)
    learners = _learners(cfg, catalog, head, population)
    head_stream_auc = pd.Series({(k.user, k.query): R.roc_auc_score(k.stream_labels, head[k.stream])
                                 if len(set(k.stream_labels.tolist())) == 2 else np.nan for k in keys})
    tags = {"scenario": "replay", "streams": sc.streams, "data_fingerprint": catalog.fingerprint, "data_dir": str(sc.path)}
    with tracking.start_run(cfg, tags=tags, run_name=f"replay-{sc.streams}-{cfg.online._target_.rsplit('.', 1)[-1]}") as active:
        rounds = R.replay(learners, keys)
        summary = R.summarize(rounds, head_stream_auc.fillna(head_stream_auc.median()))
        control = None
        if sc.control:
            for learner in learners.values():  # the control starts every learner from its population fit again
                for key in keys:
                    learner.forget(key.user, key.query)
            control = R.summarize(R.replay(learners, R.shuffle_labels(keys, cfg.seed)), head_stream_auc.fillna(0.5))
        metrics = {}
        for _, r in summary.iterrows():
            suffix = "" if r.learner == OURS else f".{r.learner}"
            group = "" if r.group == "all" else f"_{r.group}"
            metrics[f"probe_auc_at_{r.events}{group}{suffix}"] = r.probe_auc
            metrics[f"probe_lift_at_{r.events}{group}{suffix}"] = r.lift
            metrics[f"probe_lift_at_{r.events}{group}_se{suffix}"] = r.lift_se
        reached = [c for c in R.CHECKPOINTS if f"probe_auc_at_{c}" in metrics]
        metrics["probe_auc_mean"] = float(np.mean([metrics[f"probe_auc_at_{c}"] for c in reached]))
        tracking.log_metrics(metrics)
        tracking.log_table(rounds, "results/rounds.csv")
        tracking.log_table(summary, "results/summary.csv")
        import mlflow

        command = "python -m streamml.train " + " ".join(sys.argv[1:])
        commit = mlflow.get_run(active.info.run_id).data.tags.get("git_commit", "unknown")  # as the run began
        header = [f"# Replay of real feedback: {sc.source}, {sc.streams} users", "",
                  f"- Command: `{command}`", f"- Commit: {commit}", f"- Machine: {machine()}",
                  f"- MLflow run: {active.info.run_id} in experiment `{cfg.name}`",
                  f"- Learners: `{OURS}` = {learners[OURS]!r}; "
                  + ", ".join(f"`{n}` ({type(learners[n]).__name__})" for n in learners if n != OURS)]
        text = markdown(summary, control, header)
        out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
        with open(f"{out}/replay.md", "w") as fh:
            fh.write(text)
        mlflow.log_text(text, "replay.md")
    print(text)
    return metrics
