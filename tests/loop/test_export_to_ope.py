"""From the service's log to an estimate: export, then a SlateLog for the estimators."""

from __future__ import annotations

import sqlite3

import numpy as np
import pyarrow.dataset as ds
import pytest

from streamml.loop.export import SQLiteSource, export
from streamml.loop.ope import ips, slate_log_from_export
from tests.loop.test_export import served_log  # noqa: F401  (the fixture)


def _exported(db, out):
    export(SQLiteSource(db), out, settle_s=0, progress=False)
    return ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pandas().sort_values(["created", "event_id"])


def test_rewards_without_labels_are_refused_naming_the_event(served_log, tmp_path):  # noqa: F811
    db, ranked = served_log
    with sqlite3.connect(db) as conn:  # as a log of an older version left them: claims without their reward
        conn.execute("UPDATE claims SET label = NULL, time = NULL")
    df = _exported(db, tmp_path / "out")
    with pytest.raises(ValueError, match=f"event '{ranked[0]['event_id']}': the reward of item .* has no label"):
        slate_log_from_export(df, source="out")
    # events without rewards need no label: each is a slate of no accepts
    log = slate_log_from_export(df[df.n_rewards == 0])
    assert len(log) == 3 and all(r.sum() == 0 for r in log.rewards)


def test_labelled_log_gives_the_ips_of_the_logged_slates(served_log, tmp_path):  # noqa: F811
    db, ranked = served_log  # the service's claims keep each reward's label (the fixture's)
    df = _exported(db, tmp_path / "out")
    log = slate_log_from_export(df)
    by_id = dict(zip(df.event_id, log.rewards))
    assert by_id[ranked[0]["event_id"]].tolist() == [0, 0, 1]  # position 0 rejected, position 2 accepted
    assert by_id[ranked[2]["event_id"]].tolist() == [0, 1, 0]
    assert list(log.groups) == list(df.user)
    # a target that shows exactly the logged slate: IPS = sum of accepts / their propensities
    by_hand = (1 / ranked[0]["items"][2]["propensity"] + 1 / ranked[2]["items"][1]["propensity"]) / 5
    assert ips(log, [np.eye(3)] * 5).value() == pytest.approx(by_hand)
    # candidates: the target indexes catalog ids; a shown item outside them is an error
    cands = [np.array(sorted(items)[::-1]) for items in df["items"]]
    log_c = slate_log_from_export(df, candidates=cands)
    assert [c[s].tolist() for c, s in zip(cands, log_c.shown)] == [list(i) for i in df["items"]]
    with pytest.raises(ValueError, match="are not among its candidates"):
        slate_log_from_export(df, candidates=[c[1:] for c in cands])
