"""Carry every user's state over a head change: re-solve it against the new head from the logged rewards.

``python -m streamml.loop migrate model=models:/streamml@challenger log=exports/events``
(``configs/loop/migrate.yaml``: the service's config, so the backend, the online learner and
its population are the ones the service will run, plus ``log``). Run it before promoting, or
right after: the service keeps each head's states under that head's fingerprint, so the new
head's states are written beside the old ones and the old head still finds its own on a rollback.

**Why re-solve, rather than translate the old state.** A per-user residual is learned as an
offset to one head: it holds what that head got wrong for the user. Under a new head those
errors are different, so the old residual, carried as it is, would correct mistakes the new
head no longer makes (and the mixed learner's factors and prior belong to its population fit,
which is refitted with the head). The logged rewards are what the user actually said, so each
key is replayed, in time order, through the new head's learner: the state it ends with is the
one it would have if the new head had served all along. It costs one ``learn_many`` per chunk
of the log (about a million events a second, ``experiments/online_benchmark_mixed.md``), and
keys are independent, so a log split by user can be migrated partition by partition.

What it cannot carry: feedback sent to ``/v1/feedback`` without an event (not in the event
log) and rewards on raw candidate vectors (not catalog items). Keys with only those start
from the new head.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

__all__ = ["migrate", "serve_new_head", "run"]

log = logging.getLogger("streamml.loop.migrate")


def migrate(learner, rewards: pd.DataFrame, row_of: dict[int, int] | None = None, chunk: int = 50_000,
            progress: bool = True) -> dict:
    """Replay ``rewards`` (``user, query, item, label``, in time order) into ``learner``'s store.

    Each user's existing state under this learner is forgotten first, so a rerun gives the same
    states (the log holds every reward the state was learned from). ``row_of`` maps catalog
    item ids to the learner's rows (the service's :class:`~streamml.serve.lifecycle.Served`);
    None: items are rows. Returns ``{"users": n, "events": n}``.
    """
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    missing = {"user", "query", "item", "label"} - set(rewards.columns)
    if missing:
        raise ValueError(f"rewards lack the columns {sorted(missing)}")
    items = rewards["item"].to_numpy(np.int64)
    if row_of is not None:
        unknown = [i for i in np.unique(items).tolist() if i not in row_of]
        if unknown:
            where = rewards.loc[rewards["item"] == unknown[0]].iloc[0]
            raise ValueError(f"event {where.get('event_id', '?')!r}: item {unknown[0]} is not in the new head's catalog "
                             f"({len(unknown)} unknown items): migrate with the catalog the service serves")
        items = np.array([row_of[i] for i in items.tolist()], np.int64)
    users = rewards["user"].astype(str).to_numpy(object)
    queries = rewards["query"].astype(str).to_numpy(object)
    labels = rewards["label"].to_numpy(np.int64)
    for user in pd.unique(users):
        learner.forget(user)
    with tqdm(total=len(rewards), unit="event", desc="migrate", disable=not progress) as bar:
        for start in range(0, len(rewards), chunk):
            end = min(start + chunk, len(rewards))
            learner.learn_many(users[start:end], queries[start:end], items[start:end], labels[start:end])
            bar.update(end - start)
    return {"users": int(len(pd.unique(users))), "events": int(len(rewards))}


def serve_new_head(cfg, backend):
    """The head ``cfg.model`` as the service would serve it on ``backend`` (its learner writing to the
    head's own namespace), without publishing it: what the migration writes into."""
    from hydra.utils import instantiate

    from streamml.serve.lifecycle import Lifecycle

    if not backend.catalog.queries():
        raise ValueError("the backend's item catalog is empty: start the service once (it loads items_dir), "
                         "or run `python -m streamml.serve command=load_items`")
    lifecycle = Lifecycle(backend, instantiate(cfg.online), cfg.tracking_uri, cfg.experiment, population=cfg.get("population"))
    return lifecycle.activate(lifecycle.prepare(cfg.model))


def run(cfg) -> dict:
    """The command: the new head (``cfg.model``) as the service would serve it, its learner on the
    service's backend, and every labelled reward of the export ``cfg.log`` replayed into it."""
    from hydra.utils import instantiate

    from streamml.loop.logs import read_slates, reward_rows

    rewards = reward_rows(read_slates(cfg.log), source=str(cfg.log))
    backend = instantiate(cfg.backend)
    try:
        served = serve_new_head(cfg, backend)
        result = migrate(served.learner, rewards, served.row_of, progress=cfg.get("progress", True))
    finally:
        backend.close()
    result["head"] = served.head.version
    log.info(f"migrated {result['users']} users' states ({result['events']} logged rewards) to head {result['head']} "
             f"({served.head.uri})")
    return result
