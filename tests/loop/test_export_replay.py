"""The replay reads the service's own log: ranks and rewards through HTTP, the export, then
:func:`streamml.online.replay.read_export` gives back exactly the rewards that were given."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from omegaconf import OmegaConf

from streamml.loop.export import SQLiteSource, export
from streamml.online import replay as R
from streamml.online.replay_run import load_events
from tests.loop.test_export import served_log  # noqa: F401  (the fixture)

# the rewards of the fixture: (event, position, label)
GIVEN = [(0, 2, 1), (0, 0, 0), (2, 1, 1)]


def test_the_exported_rewards_replay_as_given(served_log, served_models, tmp_path):  # noqa: F811
    db, ranked = served_log
    export(SQLiteSource(db), tmp_path / "out", settle_s=0, progress=False)
    events = R.read_export(tmp_path / "out", catalog=served_models[0])
    got = {(e, int(p)): (u, q, int(i), int(label), text) for e, p, u, q, i, label, text in
           zip(events.event_id, events.position, events.user, events["query"], events.item, events.label, events.text)}
    want = {}
    for n, pos, label in GIVEN:
        shown = ranked[n]["items"][pos]
        want[(ranked[n]["event_id"], pos)] = (ranked[n]["user"], "topic_0", shown["item"], label, shown["text"])
    assert got == want  # one row per reward, none for the events without one
    assert set(R.LOG_COLUMNS) <= set(events)
    assert events.time.is_monotonic_increasing  # replayed in the order the rewards came
    # the replay scenario reads it the same way (scenario=replay scenario.source=export)
    sc = OmegaConf.create({"source": "export", "path": str(tmp_path / "out"), "catalog": str(served_models[0])})
    assert load_events(sc).equals(events)


def test_rewards_without_label_and_other_catalogs_are_named(served_log, served_models, tmp_path):  # noqa: F811
    db, ranked = served_log
    with sqlite3.connect(db) as conn:  # the first event's rewards as an older log kept them: no label
        conn.execute("UPDATE claims SET label = NULL, time = NULL WHERE event_id = ?", (ranked[0]["event_id"],))
    export(SQLiteSource(db), tmp_path / "out", settle_s=0, progress=False)
    events = R.read_export(tmp_path / "out")  # no catalog: no text, the rest as given
    assert events.event_id.tolist() == [ranked[2]["event_id"]] and "text" not in events
    other = tmp_path / "other"  # a catalog whose ids mean other items: topic_0 is gone
    other.mkdir()
    for f in served_models[0].iterdir():
        if "topic_0" not in f.name:
            shutil.copy(f, other / f.name)
    with pytest.raises(R.LogError, match=f"event '{ranked[2]['event_id']}': item .* is not that query's item in the catalog"):
        R.read_export(tmp_path / "out", catalog=other)
    with pytest.raises(FileNotFoundError, match="no export folder"):
        R.read_export(tmp_path / "missing")
