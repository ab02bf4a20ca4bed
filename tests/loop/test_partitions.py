"""The loop on Dask: partition-by-partition OPE and migration give the numbers of one process."""

from __future__ import annotations

import numpy as np
import pytest

from streamml.loop import ope
from streamml.loop.logs import read_slates
from streamml.loop.migrate import run
from streamml.loop.partitions import migrate_by_user, ope_by_user, terms_by_user
from tests.loop.test_migrate import scores_under, service_with_log


def reversed_slate(slates):
    """A target that shows each logged slate in reverse order (module level: it pickles to Dask workers)."""
    return [np.eye(len(items))[::-1] for items in slates["items"]]


@pytest.fixture
def exported(served_models, tmp_path):
    cfg, rows, query, qids = service_with_log(served_models, tmp_path, n_slates=60)
    return cfg, query, qids


@pytest.mark.parametrize("estimator", ["ips", "snips"])
def test_partitioned_ope_equals_the_one_process_estimate(exported, estimator):
    cfg = exported[0]
    slates = read_slates(cfg.log)
    assert slates["date"].nunique() == 6  # six partitions
    log = ope.slate_log_from_export(slates)
    whole = ope.bootstrap_ci(ope.ESTIMATORS[estimator](log, reversed_slate(slates)), log.groups, rng=0)
    here = ope_by_user(cfg.log, reversed_slate, estimator, k=3)
    np.testing.assert_allclose(here, whole, rtol=1e-10)
    on_dask = ope_by_user(cfg.log, reversed_slate, estimator, k=3, scheduler="local")
    np.testing.assert_allclose(on_dask, whole, rtol=1e-10)
    assert whole[1] < whole[0] < whole[2]


def test_an_unsummable_estimator_is_refused(exported):
    with pytest.raises(ValueError, match="partitioned estimators are ips, snips and dr"):
        terms_by_user(read_slates(exported[0].log), reversed_slate, "pi", 3)


def test_migration_on_dask_writes_the_states_of_one_process(served_models, tmp_path, exported):
    cfg, query, qids = exported
    users = [f"user{i}" for i in range(4)]
    one = run(cfg)
    expected = scores_under(cfg, cfg.model, query, qids, users)
    other, _, _, _ = service_with_log(served_models, tmp_path, name="dask.db", n_slates=60)
    assert migrate_by_user(other, scheduler="local") == {"users": one["users"], "events": one["events"]}
    got = scores_under(other, other.model, query, qids, users)
    for u in users:
        np.testing.assert_allclose(got[u], expected[u], rtol=1e-6, atol=1e-7)
