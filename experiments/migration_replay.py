"""Do users keep what they taught the learner when the head changes? Measured on real users (MovieLens 100k).

The replay of issue 17 (``streamml.online.replay``), with a promotion in the middle:

- **Old head**: trained, with the learner's population fit, on the population users' events
  before the median time of those events (the head that served until now).
- **New head**: trained on all of the population's events (a retrain on more logs), refitted
  the same way: this is the head that gets promoted.
- **Test users' keys** with at least ``--min-events`` events; the last third is the probe, the rest
  is what the user did before the promotion.

Per key, probe AUC of:

1. ``before``: the old head's learner after learning the key's stream (what the user had just before);
2. ``migrated``: the new head's learner after :func:`streamml.loop.migrate.migrate` replayed the same
   stream into it (what the user gets right after the promotion);
3. ``reset``: the new head's learner with no state (what the user got before this issue: states reset);
4. ``old head only``: the old head, no state (for scale).

Differences are paired per key, with standard errors clustered by user. Run for ``mixed`` (the
learner the replay chose) and the service's default residual learner.

    python experiments/migration_replay.py --out experiments/migration_replay.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score

from streamml.loop.migrate import migrate
from streamml.online import replay as R
from streamml.online.replay_run import _head_scores, load_events
from streamml.provenance import git_commit, machine

REPO = Path(__file__).resolve().parents[1]


def config(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=["+experiment=online_replay", *overrides])


def build(spec, catalog, head, population):
    learner = instantiate(spec)(items=catalog.X, item_query=catalog.item_query, head_scores=head)
    if hasattr(learner, "fit_population"):
        pop = population.assign(item=[catalog.index[(q, i)] for q, i in zip(population["query"], population["item"])])
        learner = learner.fit_population(pop.sort_values(["time", "user", "item"], kind="stable")[
            ["user", "query", "item", "label", "time"]])
    return learner


def auc(learner, key):
    return float(roc_auc_score(key.probe_labels, np.asarray(learner.score(key.user, key.query, key.probe), np.float64)))


def measure(name, spec, catalog, heads, pops, keys) -> pd.DataFrame:
    old, new = build(spec, catalog, heads[0], pops[0]), build(spec, catalog, heads[1], pops[1])
    rows = []
    for k in keys:
        n = len(k.stream)
        stream = pd.DataFrame({"user": [k.user] * n, "query": [k.query] * n, "item": k.stream, "label": k.stream_labels})
        old_only = auc(old, k)
        old.learn_many(stream.user.to_numpy(object), stream["query"].to_numpy(object), k.stream, k.stream_labels)
        before = auc(old, k)
        reset = auc(new, k)
        migrate(new, stream, progress=False)
        rows.append({"learner": name, "user": k.user, "query": k.query, "events": n, "old_head_only": old_only,
                     "before": before, "reset": reset, "migrated": auc(new, k)})
        old.forget(k.user, k.query)
        new.forget(k.user, k.query)
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> list[str]:
    lines = ["| learner | keys (users) | before | migrated | reset | old head only | migrated − before | reset − before |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d in df.groupby("learner", sort=False):
        se = {c: R.clustered_se(d[c].to_numpy(), d.user.to_numpy()) for c in ("before", "migrated", "reset", "old_head_only")}
        diff = {c: d[c] - d.before for c in ("migrated", "reset")}
        dse = {c: R.clustered_se(diff[c].to_numpy(), d.user.to_numpy()) for c in diff}
        lines.append(f"| {name} | {len(d)} ({d.user.nunique()}) | " + " | ".join(
            f"{d[c].mean():.4f} ± {se[c]:.4f}" for c in ("before", "migrated", "reset", "old_head_only"))
            + " | " + " | ".join(f"{diff[c].mean():+.4f} ± {dse[c]:.4f}" for c in ("migrated", "reset")) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-events", type=int, default=15, help="a key needs this many events (its stream: two thirds)")
    p.add_argument("--streams", choices=["tune", "test"], default="test")
    p.add_argument("--learners", nargs="+", default=["mixed", "residual"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    cfg = config([f"seed={args.seed}"])
    specs = {"mixed": cfg.online, "residual": config(["online=residual", "+rule=pointwise"]).online}
    sc = cfg.scenario
    events = load_events(sc)
    catalog = R.build_catalog(events, cache_dir=sc.get("cache_dir"))
    split = R.split_users(events.user.unique(), cfg.seed, sc.population, sc.tuning)
    population = events[events.user.astype(str).isin(split["population"])]
    older = population[population.time <= population.time.median()]
    heads = [_head_scores(cfg, catalog, older), _head_scores(cfg, catalog, population)]
    users = split["tuning" if args.streams == "tune" else "test"]
    keys = R.make_keys(events, catalog, users, args.min_events, sc.probe_fraction)
    print(f"{len(keys)} keys; heads fitted after {time.time() - t0:.0f} s", file=sys.stderr)
    df = pd.concat([measure(n, specs[n], catalog, heads, (older, population), keys) for n in args.learners])
    streams = df.groupby("learner").events.describe()[["min", "50%", "max"]].iloc[0]
    lines = ["# Users' states across a head change: re-solved from their logged events (MovieLens 100k)", "",
             f"- command: `python experiments/{Path(__file__).name} {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- commit: {git_commit(short=True, cwd=REPO)}", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {time.time() - t0:.0f} s", "",
             f"{args.streams} users' keys with at least {args.min_events} events; each key's stream (events before the "
             f"promotion: {streams['min']:.0f}–{streams['max']:.0f}, median {streams['50%']:.0f}) is learned, and its "
             "probe (the last third) scored. Old head: population events before their median time; new head: all "
             "population events. ± is the standard error clustered by user; differences are paired per key.", "",
             *table(df), "",
             "`before`: the old head's learner after the stream (just before the promotion). `migrated`: the new head's "
             "learner after `streamml.loop.migrate.migrate` replayed the stream (right after). `reset`: the new head with "
             "no state (what a head change did before). `old head only`: the old head, no state.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
