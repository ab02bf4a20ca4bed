"""Off-policy estimates over an export, partition by partition: in this process or on Dask.

Why partitions: an export is a folder of Parquet files (``date=*/part-*.parquet``,
:mod:`streamml.loop.export`), and a log worth estimating from does not fit one machine's memory.
Every estimator of :mod:`streamml.loop.ope` is a sum of per-slate terms, so each file is reduced
where it lies to its per-user sums (:class:`~streamml.loop.ope.GroupSums`, a few numbers per user)
and only those travel; their merge gives the same estimate and the same user-clustered bootstrap
as the whole log in one process (``tests/loop/test_partitions.py`` checks it on a
``dask.distributed`` local cluster). The same call runs on any Dask scheduler:
``ope_over_partitions(folder, target, client=Client("tcp://scheduler:8786"))``.

**Migration** (:func:`migrate_by_user`, the ``migrate`` command with ``dask.scheduler`` set): a
user's events must be replayed in time order by one writer, but users are independent. The
labelled rewards are shuffled by user (``dask.dataframe``), so each user's rows land in one
partition; each partition is sorted by time and replayed into the new head's learner on the
shared backend (:func:`streamml.loop.migrate.migrate`). ``scheduler``: ``"local"`` starts a
``LocalCluster``, any other string is a scheduler address (``tcp://host:8786``).

``target(df) -> list of (candidates, positions) marginal matrices`` gives the target policy's
marginals for one partition's rows (``slate_log_from_export`` indexes them by shown position when
``candidates`` is None); it must be a picklable, top-level function to reach Dask's workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from streamml.loop.export import SCHEMA
from streamml.loop.logs import partition_files, reward_rows
from streamml.loop.ope import ESTIMATORS, GroupSums, bootstrap_ci, fill_empty_positions, slate_log_from_export, snips_raw

__all__ = ["partition_files", "partition_sums", "ope_over_partitions", "client_for", "migrate_by_user"]


def partition_sums(path: str, target: Callable, estimator: str = "ips") -> GroupSums:
    """One file's per-user sums of ``estimator``'s terms for ``target``."""
    import pyarrow.parquet as pq

    if estimator not in ESTIMATORS or estimator == "pi":
        raise ValueError(f"estimator must be one of ips, snips, dr (pi needs the logging moments), got {estimator!r}")
    df = pq.read_table(path).to_pandas()
    log = slate_log_from_export(df, source=path)
    if estimator == "dr":
        marginals, rhat = target(df)
        terms = ESTIMATORS[estimator](log, marginals, rhat)
    elif estimator == "snips":  # raw: a position empty in this file may not be empty in the whole log
        terms = snips_raw(log, target(df))
    else:
        terms = ESTIMATORS[estimator](log, target(df))
    return GroupSums.of(terms, log.groups)


def ope_over_partitions(folder_or_files: str | Path | Sequence[str], target: Callable, estimator: str = "ips",
                        client=None, level: float = 0.95, n_boot: int = 2000, rng=0) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``estimator`` over every partition of an export: each file reduced by
    :func:`partition_sums` (on ``client``'s workers when given, a ``dask.distributed.Client``), then
    merged and bootstrapped by user here."""
    files = partition_files(folder_or_files) if isinstance(folder_or_files, (str, Path)) else list(folder_or_files)
    if client is None:
        parts = [partition_sums(f, target, estimator) for f in files]
    else:
        parts = client.gather(client.map(partition_sums, files, target=target, estimator=estimator, pure=False))
    parts = [p for p in parts if len(p.groups)]
    if not parts:
        raise ValueError(f"no slates in {len(files)} partition file(s)")
    sums = GroupSums.merge(parts)
    if estimator == "snips":
        sums.den = fill_empty_positions(sums.den)
    return bootstrap_ci(sums, level=level, n_boot=n_boot, rng=np.random.default_rng(rng))


@contextlib.contextmanager
def client_for(scheduler: str | None, n_workers: int = 2):
    """A ``dask.distributed.Client`` for ``scheduler`` (``"local"``: a LocalCluster of ``n_workers``
    processes; else an address), or None to run in this process."""
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



def _migrate_partition(rewards: pd.DataFrame, cfg_yaml: str) -> pd.DataFrame:
    """Replay one partition's users (all of each user's rows are here) into the new head's learner."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from streamml.loop.migrate import migrate, serve_new_head

    if len(rewards) == 0:
        return pd.DataFrame({"users": [0], "events": [0]})
    cfg = OmegaConf.create(cfg_yaml)
    backend = instantiate(cfg.backend)
    try:
        served = serve_new_head(cfg, backend)
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

    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    meta = pd.DataFrame({"user": pd.Series(dtype=str), "query": pd.Series(dtype=str), "item": pd.Series(dtype=np.int64),
                         "label": pd.Series(dtype=np.int64), "time": pd.Series(dtype=float),
                         "position": pd.Series(dtype=np.int64), "propensity": pd.Series(dtype=float),
                         "event_id": pd.Series(dtype=str), "head": pd.Series(dtype=str)})
    paths = partition_files(cfg.log)
    with client_for(scheduler, n_workers) as client:
        slates = dd.read_parquet(paths, columns=[c for c in SCHEMA.names if c != "date"])
        rewards = slates.map_partitions(lambda df: reward_rows(df).astype(meta.dtypes.to_dict()), meta=meta)
        by_user = rewards.shuffle(on="user", npartitions=max(1, n_workers))
        counts = by_user.map_partitions(_migrate_partition, cfg_yaml,
                                        meta=pd.DataFrame({"users": pd.Series(dtype=np.int64),
                                                           "events": pd.Series(dtype=np.int64)}))
        result = counts.compute(scheduler="sync") if client is None else client.compute(counts).result()
    return {"users": int(result["users"].sum()), "events": int(result["events"].sum())}
