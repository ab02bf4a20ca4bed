"""The loop beyond one machine: off-policy estimates and the migration, partition by partition, on Dask.

The export is a Parquet dataset (Arrow data, one folder per day), so any engine reads it a
partition at a time; these functions are written as a map over partitions and a small reduce,
and run on ``dask.distributed`` unchanged, or in this process when no scheduler is given:

- **Off-policy estimates** (:func:`ope_by_user`): each partition turns its slates into the
  estimator's per-slate terms (:mod:`streamml.loop.ope`) and sums them per user; the reduce adds
  the users' sums across partitions. IPS, SNIPS and DR are sums of per-slate terms, so the point
  estimate is the one-process estimate, and the bootstrap, which resamples users, needs only the
  per-user sums: the same numbers, up to the order of floating-point additions.
- **Migration** (:func:`migrate_by_user`): a user's events must be replayed in time order by
  one writer, but users are independent. The labelled rewards are shuffled so that each user's
  rows land in one partition, each partition is sorted by time and replayed into the new head's
  learner on the shared backend (:func:`streamml.loop.migrate.migrate`).

``scheduler``: None runs in this process; ``"local"`` starts a ``LocalCluster`` of ``n_workers``
processes; any other string is a scheduler address (``tcp://host:8786``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pandas as pd

from streamml.loop import ope
from streamml.loop.logs import reward_rows

__all__ = ["client_for", "ope_by_user", "migrate_by_user", "terms_by_user"]


@contextlib.contextmanager
def client_for(scheduler: str | None, n_workers: int = 2):
    """A ``dask.distributed.Client`` for ``scheduler`` (module doc), or None to run in this process."""
    if scheduler is None:
        yield None
        return
    from dask.distributed import Client, LocalCluster

    if scheduler == "local":
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client
    else:
        with Client(scheduler) as client:
            yield client


def terms_by_user(slates: pd.DataFrame, target: Callable[[pd.DataFrame], list], estimator: str, k: int) -> pd.DataFrame:
    """One partition's per-user sums of the estimator's terms: ``user, num_0..num_{J-1}, den_0..den_{J-1}``.

    ``target(slates)`` gives the target's marginals per slate (and, for ``"dr"``, returns
    ``(marginals, rhat)``), as :mod:`streamml.loop.ope` takes them; ``k`` pads positions (SNIPS).
    """
    if estimator not in ("ips", "snips", "dr"):
        raise ValueError(f"partitioned estimators are ips, snips and dr (sums of per-slate terms), got {estimator!r}")
    cols = [f"num_{j}" for j in range(k if estimator == "snips" else 1)]
    dens = [c.replace("num", "den") for c in cols]
    if len(slates) == 0:
        return pd.DataFrame(columns=["user", *cols, *dens]).astype({c: float for c in cols + dens})
    slates = slates.sort_values(["created", "event_id"], kind="stable")
    log = ope.slate_log_from_export(slates)
    out = target(slates)
    if estimator == "snips":
        terms = ope.snips_raw(log, out, k)
    elif estimator == "dr":
        terms = ope.doubly_robust(log, *out)
    else:
        terms = ope.ips(log, out)
    den = np.ones_like(terms.num) if terms.den is None else terms.den
    frame = pd.DataFrame(np.hstack([terms.num, den]), columns=cols + dens)
    frame.insert(0, "user", slates["user"].astype(str).to_numpy())
    return frame.groupby("user", sort=True).sum().reset_index()


def _reduce(per_user: pd.DataFrame, estimator: str) -> tuple[ope.Terms, np.ndarray]:
    per_user = per_user.groupby("user", sort=True).sum()
    num = per_user[[c for c in per_user if c.startswith("num_")]].to_numpy(np.float64)
    den = per_user[[c for c in per_user if c.startswith("den_")]].to_numpy(np.float64)
    if estimator == "snips":
        return ope.Terms(num, ope.fill_empty_positions(den)), per_user.index.to_numpy()
    return ope.Terms(num, den), per_user.index.to_numpy()  # den: slates per user, so the ratio is the mean over slates


def ope_by_user(folder: str, target: Callable, estimator: str = "snips", k: int = 10, scheduler: str | None = None,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0, n_workers: int = 2) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``target`` on the export ``folder``, partition by partition; the
    bootstrap resamples users (:func:`streamml.loop.ope.bootstrap_ci`). ``target`` must pickle to run on Dask."""
    from streamml.loop.logs import _parts

    paths = [str(p) for p in _parts(folder)]
    with client_for(scheduler, n_workers) as client:
        if client is None:
            parts = [terms_by_user(pd.read_parquet(p), target, estimator, k) for p in paths]
        else:
            futures = client.map(lambda p: terms_by_user(pd.read_parquet(p), target, estimator, k), paths)
            parts = client.gather(futures)
    terms, users = _reduce(pd.concat(parts, ignore_index=True), estimator)
    return ope.bootstrap_ci(terms, users, level=level, n_boot=n_boot, rng=seed)


def _migrate_partition(rewards: pd.DataFrame, cfg_yaml: str) -> pd.DataFrame:
    """Replay one partition's users (all of each user's rows are here) into the new head's learner."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from streamml.loop.migrate import migrate
    from streamml.serve.lifecycle import Lifecycle

    if len(rewards) == 0:
        return pd.DataFrame({"users": [0], "events": [0]})
    cfg = OmegaConf.create(cfg_yaml)
    backend = instantiate(cfg.backend)
    try:
        lifecycle = Lifecycle(backend, instantiate(cfg.online), cfg.tracking_uri, cfg.experiment,
                              population=cfg.get("population"))
        served = lifecycle.activate(lifecycle.prepare(cfg.model))
        ordered = rewards.sort_values(["time", "event_id", "position"], kind="stable")
        done = migrate(served.learner, ordered, served.row_of, progress=False)
    finally:
        backend.close()
    return pd.DataFrame({"users": [done["users"]], "events": [done["events"]]})


def migrate_by_user(cfg, scheduler: str | None = None, n_workers: int = 2) -> dict:
    """The ``migrate`` command on Dask: rewards shuffled by user, each partition replayed by one task.

    ``cfg`` is the ``loop/migrate`` config (resolved and sent to the workers as YAML). Returns
    ``{"users": n, "events": n}``.
    """
    import dask.dataframe as dd
    from omegaconf import OmegaConf

    from streamml.loop.logs import _parts

    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    meta = pd.DataFrame({"user": pd.Series(dtype=str), "query": pd.Series(dtype=str), "item": pd.Series(dtype=np.int64),
                         "label": pd.Series(dtype=np.int64), "time": pd.Series(dtype=float),
                         "position": pd.Series(dtype=np.int64), "propensity": pd.Series(dtype=float),
                         "event_id": pd.Series(dtype=str), "head": pd.Series(dtype=str)})
    paths = [str(p) for p in _parts(cfg.log)]
    with client_for(scheduler, n_workers) as client:
        slates = dd.read_parquet(paths)
        rewards = slates.map_partitions(lambda df: reward_rows(df).astype(meta.dtypes.to_dict()), meta=meta)
        by_user = rewards.shuffle(on="user", npartitions=max(1, n_workers))
        counts = by_user.map_partitions(_migrate_partition, cfg_yaml,
                                        meta=pd.DataFrame({"users": pd.Series(dtype=np.int64),
                                                           "events": pd.Series(dtype=np.int64)}))
        result = counts.compute(scheduler="sync") if client is None else client.compute(counts).result()
    return {"users": int(result["users"].sum()), "events": int(result["events"].sum())}
