"""One SQLite file in WAL mode shared by processes: the connection per process and thread,
transactions with a prompt write lock, and the background checkpointer (see :mod:`streamml.stores.sqlite`
for why each is the way it is)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from streamml.stores.errors import StoreUnavailable

__all__ = ["SQLiteDB", "Checkpointer", "open_db", "chunks"]

CHUNK = 500  # keys per statement: well under SQLite's limit on bound variables


class SQLiteDB:
    """One SQLite file in WAL mode, with a connection per process and thread.

    Parameters
    ----------
    path
        The database file (created if absent).
    synchronous
        ``"NORMAL"`` (survives a killed process) or ``"FULL"`` (also survives an OS
        crash, one fsync per commit); see the module docstring.
    busy_timeout_s
        How long a writer waits for another process's write lock before failing
        with :class:`StoreUnavailable`.
    page_size
        Bytes per page of a new file (ignored for an existing one).
    autocheckpoint
        WAL pages after which a commit also checkpoints (SQLite's ``wal_autocheckpoint``);
        0: never in a commit, leave it to a :class:`Checkpointer` (or :meth:`checkpoint`).
    """

    def __init__(self, path: str | Path, synchronous: str = "NORMAL", busy_timeout_s: float = 10.0, page_size: int = 16384,
                 autocheckpoint: int = 1000):
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = float(busy_timeout_s)
        self.page_size = int(page_size)
        self.autocheckpoint = int(autocheckpoint)
        if self.autocheckpoint < 0:
            raise ValueError(f"autocheckpoint must be >= 0 pages, got {autocheckpoint}")
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn  # create the file and set its page size and journal mode now

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteDB({str(self.path)!r})"

    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA page_size={self.page_size}")  # only takes effect on an empty file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={self.autocheckpoint}")
            local.conn, local.pid = conn, os.getpid()
        return local.conn

    def close(self) -> None:
        """Close this thread's connection (the next use opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` (write) or ``BEGIN`` (a consistent read) ... ``COMMIT``;
        rolls back on any exception. A lock held past the busy timeout raises
        :class:`StoreUnavailable`."""
        conn = self.conn
        try:
            if write:
                self._begin_immediate(conn)
            else:
                conn.execute("BEGIN")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"SQLite {self.path}: {e}") from e
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                conn.execute("ROLLBACK")
                raise StoreUnavailable(f"SQLite {self.path}: {e}") from e

    def probe_write(self, timeout_s: float) -> None:
        """Take the write lock and give it back at once, waiting at most ``timeout_s``:
        :class:`StoreUnavailable` if the file cannot be read or another connection holds the lock
        longer (a readiness check: the writes of requests would queue behind it)."""
        conn = self.conn
        try:
            self._begin_immediate(conn, min(timeout_s, self.busy_timeout_s))
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"SQLite {self.path}: {e}") from e

    def _begin_immediate(self, conn: sqlite3.Connection, timeout_s: float | None = None) -> None:
        """``BEGIN IMMEDIATE``, retried every 0.2 ms (later 1 ms) while another connection
        holds the write lock, up to the busy timeout. SQLite's own busy handler sleeps 1, 2,
        5, 10, 15, 20, 25 ms ... between tries, so a writer queued behind a sub-millisecond
        commit of another worker would wait milliseconds (``experiments/serve_stores_figures.md``)."""
        conn.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + (self.busy_timeout_s if timeout_s is None else timeout_s)
            tries = 0
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if conn.in_transaction or "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                tries += 1
                time.sleep(0.0002 if tries < 50 else 0.001)
        finally:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int]:
        """A checkpoint on this thread's connection. ``PASSIVE`` copies what it can of the WAL
        into the database without waiting for readers or writers; ``RESTART`` also waits (busy
        timeout) for a moment without writers and then starts the WAL over from its beginning.
        Returns (WAL frames, frames checkpointed); (-1, -1) if it could not run."""
        if mode not in ("PASSIVE", "RESTART"):
            raise ValueError(f"mode must be 'PASSIVE' or 'RESTART', got {mode!r}")
        try:
            busy, frames, done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.OperationalError:  # "database is locked": another process's checkpoint runs
            return -1, -1
        return (-1, -1) if busy else (frames, done)

    def meta_get(self, conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def meta_set(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def ensure_meta(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


class Checkpointer:
    """A daemon thread that checkpoints ``db`` every ``interval_s`` seconds, on its own
    connection, until :meth:`stop`. Use it with ``SQLiteDB(..., autocheckpoint=0)``, so no
    request pays for a checkpoint; each process that writes may run one (a checkpoint
    already running elsewhere is skipped).

    Each tick is a ``PASSIVE`` checkpoint. Under steady writes that alone never lets the
    WAL start over (new commits land while it copies), so once the WAL holds more than
    ``restart_frames`` frames a ``RESTART`` checkpoint follows the passive one: it waits for
    a gap between commits, copies the few frames committed since, and starts the WAL over;
    writers wait for it about as long as for a few other commits.
    """

    def __init__(self, db: SQLiteDB, interval_s: float = 0.1, restart_frames: int = 1000):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.db, self.interval_s, self.restart_frames = db, float(interval_s), int(restart_frames)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint {db.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = self.db.conn  # this thread's own connection
        try:
            while not self._stop.wait(self.interval_s):
                frames, done = self.db.checkpoint()
                if frames > self.restart_frames:
                    self.db.checkpoint("RESTART")
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10)

def open_db(db: SQLiteDB | str | Path, **kwargs) -> SQLiteDB:
    return db if isinstance(db, SQLiteDB) else SQLiteDB(db, **kwargs)


def chunks(seq: list, size: int = CHUNK):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
