"""SQLite specifics: the file's mode, schema checks, threads, SIGKILL durability, the CLI.

The shared behaviour is in ``test_store_contract.py`` (state) and ``test_events_and_items.py``
(event log, item catalog).
"""

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from streamml.stores import Checkpointer, Field, SQLiteDB, SQLiteItems, SQLiteStore
from streamml.stores.sqlite import main
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]

SCHEMA = {"r": Field((4,), "float16"), "n": Field((), "int64")}


def test_one_wal_file_with_big_pages(tmp_path):
    store = SQLiteStore(SCHEMA, tmp_path / "s.db")
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert SQLiteDB(tmp_path / "f.db", synchronous="full").conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteDB(tmp_path / "x.db", synchronous="OFF")


def test_checkpointer_copies_the_wal_and_starts_it_over_off_the_writing_thread(tmp_path):
    db = SQLiteDB(tmp_path / "s.db", autocheckpoint=0)
    assert db.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    store = SQLiteStore(SCHEMA, db)
    for i in range(40):  # one commit each: 40+ frames of WAL, never checkpointed by a commit
        store.put_many([i], {"r": np.full((1, 4), i), "n": np.array([i])})
    frames, done = db.checkpoint()
    assert frames >= 40 and done == frames
    checkpointer = Checkpointer(db, interval_s=0.01, restart_frames=10)
    try:
        store.put_many([100], {"r": np.zeros((1, 4)), "n": np.array([100])})
        wait_until(lambda: db.checkpoint()[0] < frames, "the checkpointer to restart the WAL (a short WAL again)")
    finally:
        checkpointer.stop()
    assert not checkpointer._thread.is_alive()
    fresh = SQLiteStore(SCHEMA, tmp_path / "s.db")  # everything is in the file, whichever part of the WAL it came from
    assert fresh.get_many(list(range(40)) + [100])["n"].tolist() == list(range(40)) + [100]
    with pytest.raises(ValueError, match="autocheckpoint"):
        SQLiteDB(tmp_path / "x.db", autocheckpoint=-1)
    with pytest.raises(ValueError, match="mode"):
        db.checkpoint("TRUNCATE")


def test_a_writer_waits_for_the_write_lock_then_gives_up_after_the_busy_timeout(tmp_path):
    import sqlite3
    import threading

    from streamml.stores import StoreUnavailable

    SQLiteStore(SCHEMA, tmp_path / "s.db")  # creates the file and its table
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)

    def hold(seconds):
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(seconds, lambda: holder.execute("COMMIT")).start()

    store = SQLiteStore(SCHEMA, SQLiteDB(tmp_path / "s.db", busy_timeout_s=5.0))
    hold(0.05)
    store.put_many([1], {"r": np.ones((1, 4)), "n": np.array([1])})  # waits for the lock, then writes
    assert store.get_many([1])["n"].tolist() == [1]
    impatient = SQLiteStore(SCHEMA, SQLiteDB(tmp_path / "s.db", busy_timeout_s=0.05))
    holder.execute("BEGIN IMMEDIATE")  # held until this test lets go, whatever the machine's speed
    with pytest.raises(StoreUnavailable, match="locked"):
        impatient.put_many([2], {"r": np.ones((1, 4)), "n": np.array([2])})
    holder.execute("COMMIT")
    assert impatient.db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 50  # restored after the retries
    impatient.put_many([2], {"r": np.ones((1, 4)), "n": np.array([2])})
    assert store.get_many([1, 2])["n"].tolist() == [1, 2]


def test_close_then_reuse(tmp_path):
    store = SQLiteStore(SCHEMA, tmp_path / "s.db")
    store.put_many([1], {"n": np.array([4])})
    store.db.close()
    assert store.get_many([1])["n"].tolist() == [4]  # reopened on use


def test_tables_share_one_file_and_bad_table_names_fail(tmp_path):
    db = SQLiteDB(tmp_path / "s.db")
    a, b = SQLiteStore(SCHEMA, db, table="a"), SQLiteStore({"x": Field((), "int8")}, db, table="b")
    a.put_many([1], {"n": np.array([4])})
    assert len(a) == 1 and len(b) == 0
    for bad in ("events", "x; DROP TABLE a", "1abc"):
        with pytest.raises(ValueError, match="table"):
            SQLiteStore(SCHEMA, db, table=bad)


def test_another_schema_is_refused_unless_reset(tmp_path):
    path = tmp_path / "s.db"
    SQLiteStore(SCHEMA, path).put_many([1], {"n": np.array([4])})
    other = {"r": Field((8,), "float16"), "n": Field((), "int64")}
    with pytest.raises(ValueError, match="schema"):
        SQLiteStore(other, path)
    assert SQLiteStore(SCHEMA, path).get_many([1])["n"].tolist() == [4]  # untouched
    store = SQLiteStore(other, path, on_schema_mismatch="reset")
    assert len(store) == 0 and store.get_many([1])["r"].shape == (1, 8)


def test_threads_share_a_store(tmp_path):
    """The service calls a store from a thread pool: a connection per thread, no lost update."""
    store = SQLiteStore(SCHEMA, tmp_path / "s.db")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: store.update_many(["k"], lambda s: {"n": s["n"] + 1}), range(200)))
    assert store.get_many(["k"])["n"].tolist() == [200]


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from streamml.stores import Field, SQLiteStore
    store = SQLiteStore({"r": Field((4,), "float16"), "n": Field((), "int64")}, sys.argv[1])
    for i in range(1, 100000):
        store.update_many([("u", "q")], lambda s: {"n": s["n"] + 1})
        print(i, flush=True)  # acknowledged: the commit returned
    """
)


@pytest.mark.slow
def test_acknowledged_updates_survive_sigkill(tmp_path):
    path = tmp_path / "s.db"
    SQLiteStore(SCHEMA, path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    acked = 0
    for line in proc.stdout:
        acked = int(line)
        if acked >= 300:
            proc.send_signal(signal.SIGKILL)
            break
    acked = max([acked, *(int(x) for x in proc.stdout.read().split())])
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    n = int(SQLiteStore(SCHEMA, path).get_many([("u", "q")])["n"][0])
    assert acked <= n <= acked + 1  # every acknowledged update is there; at most one unacknowledged


def test_items_cli_loads_a_folder(query_dir, tmp_path, capsys):
    db = tmp_path / "state.db"
    main(["load", str(query_dir), "--db", str(db)])
    assert "loaded 48 items of 3 queries" in capsys.readouterr().out
    assert SQLiteItems(db).queries() == ["topic_0", "topic_1", "topic_2"]


def test_an_event_log_of_an_older_version_gains_the_rewards_label_and_time(tmp_path):
    """A file written before claims kept the reward: its claims read as rewards without label or time."""
    import sqlite3

    from streamml.stores import SQLiteEventLog

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE events (event_id TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL, "
                     "record TEXT NOT NULL)")
        conn.execute("CREATE TABLE claims (event_id TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (event_id, item)) "
                     "WITHOUT ROWID")
        conn.execute("INSERT INTO events VALUES ('e1', 1.0, 1e12, '{\"user\": \"u\", \"shown\": [3, 5], \"created\": 1.0}')")
        conn.execute("INSERT INTO claims VALUES ('e1', '3')")
    log = SQLiteEventLog(path)
    assert log.rewards("e1") == [(3, None, None)]
    assert log.claim("e1", 5, label=1, time=2.5)
    assert log.rewards("e1") == [(3, None, None), (5, 1, 2.5)]
    assert SQLiteEventLog(path).rewards("e1") == log.rewards("e1")  # reopening migrates nothing twice
