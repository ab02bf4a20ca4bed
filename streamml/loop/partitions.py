"""Off-policy estimates over an export, partition by partition: in this process or on Dask.

Why partitions: an export is a folder of Parquet files (``date=*/part-*.parquet``,
:mod:`streamml.loop.export`), and a log worth estimating from does not fit one machine's memory.
Every estimator of :mod:`streamml.loop.ope` is a sum of per-slate terms, so each file is reduced
where it lies to its per-user sums (:class:`~streamml.loop.ope.GroupSums`, a few numbers per user)
and only those travel; their merge gives the same estimate and the same user-clustered bootstrap
as the whole log in one process (``tests/loop/test_partitions.py`` checks it on a
``dask.distributed`` local cluster). The same call runs on any Dask scheduler:
``ope_over_partitions(folder, target, client=Client("tcp://scheduler:8786"))``.

``target(df) -> list of (candidates, positions) marginal matrices`` gives the target policy's
marginals for one partition's rows (``slate_log_from_export`` indexes them by shown position when
``candidates`` is None); it must be a picklable, top-level function to reach Dask's workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from streamml.loop.ope import ESTIMATORS, GroupSums, bootstrap_ci, slate_log_from_export

__all__ = ["partition_files", "partition_sums", "ope_over_partitions"]


def partition_files(folder: str | Path) -> list[str]:
    """The export's Parquet files, in a fixed order (date partition, then chunk)."""
    files = sorted(str(p) for p in Path(folder).glob("date=*/part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no date=*/part-*.parquet files (python -m streamml.loop export out={folder})")
    return files


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
    return bootstrap_ci(GroupSums.merge(parts), level=level, n_boot=n_boot, rng=np.random.default_rng(rng))
