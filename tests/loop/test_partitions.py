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


def test_a_position_empty_in_one_file_is_not_filled_before_the_merge(tmp_path):
    """SNIPS over files: position 2 is answered only in the second file; filling it per file would
    add a denominator the whole log does not have."""
    import pandas as pd

    from streamml.loop.export import _write_chunk
    from tests.loop.test_retrain import slate

    rows = [slate("a", "u1", "q", [0, 1], [0.5, 0.5], [(0, 1)], 1.7e9),
            dict(slate("b", "u2", "q", [0, 1, 2], [0.5, 0.5, 0.2], [(2, 1)], 1.7e9 + 86400), date="2026-12-06")]
    _write_chunk(tmp_path, rows, 0)
    whole = snips(slate_log_from_export(pd.DataFrame(rows)), [np.eye(2), np.eye(3)]).value()
    got = ope_over_partitions(tmp_path, lambda df: [np.eye(len(i)) for i in df["items"]], "snips", rng=0)[0]
    assert got == pytest.approx(whole) and whole == pytest.approx(2 / 4 + 0.0 + 5 / 5)  # per file: 2/4 + 5/(1 + 5)


def test_migration_on_dask_writes_the_states_of_one_process(served_models, tmp_path):
    from streamml.loop.migrate import run
    from streamml.loop.partitions import migrate_by_user
    from tests.loop.test_migrate import scores_under, service_with_log

    one_dir, dask_dir = tmp_path / "one", tmp_path / "dask"
    cfg, _, query, qids = service_with_log(served_models, one_dir, n_slates=60)
    users = [f"user{i}" for i in range(4)]
    one = run(cfg)
    expected = scores_under(cfg, cfg.model, query, qids, users)
    other, _, _, _ = service_with_log(served_models, dask_dir, n_slates=60)
    assert len(partition_files(other.log)) == 6
    assert migrate_by_user(other, scheduler="local") == {"users": one["users"], "events": one["events"]}
    got = scores_under(other, other.model, query, qids, users)
    for u in users:
        np.testing.assert_allclose(got[u], expected[u], rtol=1e-6, atol=1e-7)
