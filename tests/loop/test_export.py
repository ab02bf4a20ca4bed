"""Export: a SQLite event log written by the service itself (ranks and rewards through HTTP) to Parquet."""

from __future__ import annotations

import json
import sqlite3
import time

import pyarrow.dataset as ds
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from streamml.loop.__main__ import export as export_main
from streamml.loop.export import SCHEMA_VERSION, SQLiteSource, export, read_state
from streamml.serve.app import create_app
from tests.serve.serve_helpers import REPO, serve_cfg


@pytest.fixture
def served_log(served_models, tmp_path):
    """The service's SQLite file after 5 ranks: events 0 and 2 rewarded (2 and 1 items), the rest not."""
    cfg = serve_cfg(*served_models[:2], backend="sqlite")
    with open_dict(cfg):
        cfg.backend.path = str(tmp_path / "serve.db")
    ranked = []
    with TestClient(create_app(cfg)) as client:
        for i in range(5):
            r = client.post("/v1/rank", json={"user": f"u{i % 2}", "query": "topic_0", "k": 3})
            assert r.status_code == 200, r.text
            ranked.append(r.json())
        for i, rewards in [(0, [(2, "accepted"), (0, "rejected")]), (2, [(1, "accepted")])]:
            body = {"rewards": [{"item": ranked[i]["items"][p]["item"], "label": label} for p, label in rewards]}
            r = client.post(f"/v1/events/{ranked[i]['event_id']}/reward", json=body)
            assert r.status_code == 200 and r.json()["applied"] == len(rewards), r.text
    return tmp_path / "serve.db", ranked


def _read(out):
    return ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pandas().sort_values(["created", "event_id"])


def test_every_event_is_a_row_with_its_slate_and_rewards(served_log, tmp_path):
    db, ranked = served_log
    state = export(SQLiteSource(db), tmp_path / "out", settle_s=0, progress=False)
    assert state["rows"] == 5 and state["schema_version"] == SCHEMA_VERSION
    df = _read(tmp_path / "out").set_index("event_id")
    assert sorted(df.index) == sorted(r["event_id"] for r in ranked)
    for r in ranked:
        row = df.loc[r["event_id"]]
        assert row.user == r["user"] and row.query == "topic_0" and row.bucket == "main"
        assert row.policy == r["policy"] and row["head"] == r["model_version"] and not row.raw_candidates
        assert list(row["items"]) == [s["item"] for s in r["items"]]
        assert list(row.propensities) == pytest.approx([s["propensity"] for s in r["items"]])
        assert list(row.positions) == [0, 1, 2]
    rewarded = {r["event_id"]: [(int(x["item"]), int(x["position"])) for x in row.rewards] for r in ranked
                for row in [df.loc[r["event_id"]]]}
    # rewards in display order, with the label and time the service kept in their claims
    assert rewarded[ranked[0]["event_id"]] == [(ranked[0]["items"][0]["item"], 0), (ranked[0]["items"][2]["item"], 2)]
    assert rewarded[ranked[2]["event_id"]] == [(ranked[2]["items"][1]["item"], 1)]
    assert [x["label"] for x in df.loc[ranked[0]["event_id"]].rewards] == [0, 1]  # rejected at 0, accepted at 2
    assert [x["label"] for x in df.loc[ranked[2]["event_id"]].rewards] == [1]
    times = [x["time"] for i in (0, 2) for x in df.loc[ranked[i]["event_id"]].rewards]
    assert all(df.created.max() <= t <= time.time() for t in times)  # given after every rank of the fixture
    # events without a reward are rows too, with no rewards
    for i in (1, 3, 4):
        assert df.loc[ranked[i]["event_id"]].n_rewards == 0 and len(df.loc[ranked[i]["event_id"]].rewards) == 0
    day = time.strftime("%Y-%m-%d", time.gmtime(df.created.iloc[0]))
    assert (tmp_path / "out" / f"date={day}").is_dir()


def test_only_settled_events_are_exported_and_a_rerun_resumes(served_log, tmp_path):
    db, ranked = served_log
    created = sorted(json.loads(t)["created"] for (t,) in sqlite3.connect(db).execute("SELECT record FROM events"))
    out = tmp_path / "out"
    # the reward window of the last two events is still open: they may still get a reward
    state = export(SQLiteSource(db), out, settle_s=600, now=created[2] + 600, progress=False)
    assert state["rows"] == 3
    # one chunk of 1 event, then stop (a killed run); the next run goes on from the cursor
    state = export(SQLiteSource(db), out, chunk=1, settle_s=0, max_chunks=1, progress=False)
    assert state["rows"] == 4 and read_state(out)["chunks"] == 2
    state = export(SQLiteSource(db), out, chunk=1, settle_s=0, progress=False)
    assert state["rows"] == 5
    assert export(SQLiteSource(db), out, settle_s=0, progress=False)["rows"] == 5  # nothing new
    df = _read(out)
    assert df.event_id.is_unique and len(df) == 5
    assert sorted(df.event_id) == sorted(r["event_id"] for r in ranked)


def test_a_log_of_an_older_version_exports_its_rewards_without_label_and_time(served_log, tmp_path):
    """A claims table without the label and time columns (before the service kept them)."""
    db, ranked = served_log
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE claims DROP COLUMN label")
        conn.execute("ALTER TABLE claims DROP COLUMN time")
    export(SQLiteSource(db), tmp_path / "out", settle_s=0, progress=False)
    df = _read(tmp_path / "out").set_index("event_id")
    assert [(x["item"], x["label"], x["time"]) for x in df.loc[ranked[2]["event_id"]].rewards] == [
        (ranked[2]["items"][1]["item"], None, None)]


def test_a_bad_record_names_the_file_and_event(served_log, tmp_path):
    db, ranked = served_log
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE events SET record = '{\"user\": \"u0\"}' WHERE event_id = ?", (ranked[1]["event_id"],))
    with pytest.raises(ValueError, match=f"serve.db, event '{ranked[1]['event_id']}': not a served slate"):
        export(SQLiteSource(db), tmp_path / "out", settle_s=0, progress=False)
    with pytest.raises(FileNotFoundError, match="no SQLite event log"):
        SQLiteSource(tmp_path / "missing.db")


def test_the_hydra_entry_exports(served_log, tmp_path):
    db, _ = served_log
    with initialize_config_dir(config_dir=str(REPO / "configs" / "loop"), version_base="1.3"):
        cfg = compose("export", overrides=[f"source.path={db}", f"out={tmp_path / 'out'}", "settle_s=0", "progress=false"])
    assert export_main(cfg)["rows"] == 5
