"""OPE partition by partition gives the numbers of one process: in this process and on a Dask local cluster."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.dataset as ds
import pytest

from streamml.loop.export import SQLiteSource, export
from streamml.loop.ope import bootstrap_ci, doubly_robust, ips, slate_log_from_export, snips
from streamml.loop.partitions import ope_over_partitions, partition_files
from streamml.stores import SQLiteEventLog

SWAP = np.eye(3)[[1, 0, 2]]


def half_swapped(df):
    """The target: the logged slate, with its first two items swapped half of the time (picklable: top level)."""
    return [0.5 * np.eye(3) + 0.5 * SWAP for _ in range(len(df))]


def half_swapped_dr(df):
    return half_swapped(df), [np.full(3, 0.3) for _ in range(len(df))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """300 slates of 25 users over 5 days, written through the event log, exported in chunks of 40:
    a user's slates lie in several files."""
    root = tmp_path_factory.mktemp("partitions")
    log, rng = SQLiteEventLog(root / "serve.db"), np.random.default_rng(0)
    base = time.time() - 6 * 86400
    for n in range(300):
        props = rng.choice([0.9, 0.5, 0.2], size=3)
        event_id = f"e{n:04d}"
        log.create(event_id, {"user": f"u{rng.integers(25)}", "query": "q", "created": base + n * 1440,
                              "shown": [int(i) for i in rng.permutation(20)[:3]], "propensities": props.tolist()},
                   ttl_s=30 * 86400)
        shown = log.get(event_id)["shown"]
        for j in np.flatnonzero(rng.random(3) < 0.4):
            assert log.claim(event_id, shown[j], label=int(rng.random() < 0.6), time=base + n * 1440 + 5)
    export(SQLiteSource(root / "serve.db"), root / "out", chunk=40, settle_s=0, progress=False)
    return root / "out"


def _one_process(out, estimator):
    df = ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pandas()
    log = slate_log_from_export(df)
    terms = doubly_robust(log, *half_swapped_dr(df)) if estimator is doubly_robust else estimator(log, half_swapped(df))
    return bootstrap_ci(terms, log.groups, rng=np.random.default_rng(0))


@pytest.mark.parametrize("name, estimator, target", [("ips", ips, half_swapped), ("snips", snips, half_swapped),
                                                     ("dr", doubly_robust, half_swapped_dr)])
def test_partitions_in_this_process_give_the_whole_logs_estimate(exported, name, estimator, target):
    assert len(partition_files(exported)) >= 8  # 300 events in chunks of 40, split by day
    whole = _one_process(exported, estimator)
    assert whole[1] < whole[0] < whole[2]
    assert ope_over_partitions(exported, target, name, rng=0) == pytest.approx(whole, rel=1e-12)


@pytest.mark.slow
def test_a_dask_local_cluster_gives_the_numbers_of_one_process(exported):
    distributed = pytest.importorskip("distributed", reason="the loop extra: pip install -e '.[loop]'")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        for name, estimator, target in [("ips", ips, half_swapped), ("snips", snips, half_swapped)]:
            got = ope_over_partitions(exported, target, name, client=client, rng=0)
            assert got == pytest.approx(_one_process(exported, estimator), rel=1e-12)
