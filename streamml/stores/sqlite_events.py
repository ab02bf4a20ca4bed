"""The event log in the service's SQLite file: events, first-wins claims (the claim SQL, once),
per-user client event ids and recent rejects, with expiry (the contract of
:class:`streamml.stores.events.EventLog`)."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

from streamml.stores.codec import encode_key, to_json
from streamml.stores.events import Claim, Reward, shown_rewards
from streamml.stores.sqlite_db import SQLiteDB, open_db

__all__ = ["SQLiteEventLog"]


def _client_id(user: str, client_event_id: str) -> str:
    """The ``client_events`` key: ids are per user (``["alice","c1"]``)."""
    return encode_key((str(user), str(client_event_id)))


class SQLiteEventLog:
    """Served events, the rewards claimed on them, and client event ids, with expiry.

    ``create`` stores an event's record (user, query, shown items, propensities,
    model version, bucket ...) as JSON, stamped with ``created`` (epoch seconds);
    it is kept ``ttl_s`` seconds. The service judges late rewards by ``created``;
    the TTL only bounds how long events are kept. ``claim`` is first-wins per
    (event, item); ``claim_client_event`` is first-wins per client id until it expires;
    ``release`` and ``release_client_event`` undo a claim whose update then failed.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> log = SQLiteEventLog(pathlib.Path(tempfile.mkdtemp()) / "state.db")
    >>> log.create("e1", {"user": 7, "items": [3, 5]}, ttl_s=60)
    >>> log.get("e1")["items"], log.get("nope")
    ([3, 5], None)
    >>> log.claim("e1", 3), log.claim("e1", 3), log.claim("e1", 5)
    (True, False, True)
    """

    def __init__(self, path: SQLiteDB | str | Path, clock: Callable[[], float] = time.time, **db_kwargs):
        self.db = open_db(path, **db_kwargs)
        self.clock = clock
        self._creates = 0
        self.db.ensure_meta()
        with self.db.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, created REAL NOT NULL, "
                "expires REAL NOT NULL, record TEXT NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS events_expires ON events(expires)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS claims (event_id TEXT NOT NULL, item TEXT NOT NULL, label INTEGER, time REAL, "
                "PRIMARY KEY (event_id, item)) WITHOUT ROWID"
            )
            # a file of an older version: its claims kept no reward (their label and time read as NULL)
            have = {r[1] for r in conn.execute("PRAGMA table_info(claims)")}
            for column, kind in (("label", "INTEGER"), ("time", "REAL")):
                if column not in have:
                    conn.execute(f"ALTER TABLE claims ADD COLUMN {column} {kind}")
            conn.execute("CREATE TABLE IF NOT EXISTS client_events (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rejected (user TEXT NOT NULL, query TEXT NOT NULL, item INTEGER NOT NULL, "
                "expires REAL NOT NULL, PRIMARY KEY (user, query, item)) WITHOUT ROWID"
            )

    def new_event_id(self, user: str) -> str:
        """A fresh random event id (32 hex digits)."""
        return uuid.uuid4().hex

    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None:
        """Store a new event; an existing, unexpired ``event_id`` is a ``ValueError``."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self.clock()
        rec = dict(record)
        rec.setdefault("created", now)
        text = to_json(rec)
        self._creates += 1
        if self._creates % 1000 == 0:
            self.purge()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT expires FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if row is not None and row[0] > now:
                raise ValueError(f"event {event_id!r} already exists")
            if row is not None:
                conn.execute("DELETE FROM claims WHERE event_id = ?", (event_id,))
            conn.execute(
                "INSERT OR REPLACE INTO events(event_id, created, expires, record) VALUES (?, ?, ?, ?)",
                (event_id, rec["created"], now + ttl_s, text),
            )

    def get(self, event_id: str) -> dict | None:
        """The event's record (with ``created``), or None if unknown or expired."""
        row = self.db.conn.execute("SELECT expires, record FROM events WHERE event_id = ?", (event_id,)).fetchone()
        if row is None or row[0] <= self.clock():
            return None
        return json.loads(row[1])

    def claim_in(self, conn: sqlite3.Connection, claim: Claim) -> bool:
        """Win ``claim`` inside the caller's write transaction on ``conn``: the one place of
        the claim SQL (the service runs it in the transaction of the state update it guards).
        Raises ``KeyError`` if a reward's event is unknown or expired."""
        now = self.clock()
        if claim.kind == "event":
            row = conn.execute("SELECT expires FROM events WHERE event_id = ?", (claim.ident,)).fetchone()
            if row is None or row[0] <= now:
                raise KeyError(f"unknown or expired event {claim.ident!r}")
            return conn.execute("INSERT OR IGNORE INTO claims(event_id, item, label, time) VALUES (?, ?, ?, ?)",
                                (claim.ident, encode_key(claim.item, "claim item"), claim.label, claim.time)).rowcount == 1
        return conn.execute(
            "INSERT INTO client_events(id, expires) VALUES (?, ?) "
            "ON CONFLICT(id) DO UPDATE SET expires = excluded.expires WHERE client_events.expires <= ?",
            (_client_id(claim.user, claim.ident), now + claim.ttl_s, now),
        ).rowcount == 1

    def claim(self, event_id: str, item: Hashable, label: int | None = None, time: float | None = None) -> bool:
        """True exactly once per (event, item): for the first reward of that item, whose ``label``
        and ``time`` are kept with the claim. Raises ``KeyError`` if the event is unknown or expired."""
        with self.db.transaction() as conn:
            return self.claim_in(conn, Claim("event", "", event_id, item, label=label, time=time))

    def rewards(self, event_id: str) -> list[Reward]:
        """The claimed rewards of the event's shown items, in display order (:class:`~streamml.stores.events.Reward`)."""
        rows = self.db.conn.execute("SELECT item, label, time FROM claims WHERE event_id = ?", (event_id,)).fetchall()
        return shown_rewards(self.get(event_id), {item: (label, t) for item, label, t in rows})

    def release(self, event_id: str, item: Hashable) -> None:
        """Undo a claim whose update could not be applied, so a retried reward counts."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM claims WHERE event_id = ? AND item = ?", (event_id, encode_key(item, "release item")))

    def release_client_event(self, user: str, client_event_id: str) -> None:
        """Undo :meth:`claim_client_event` (its update could not be applied)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM client_events WHERE id = ?", (_client_id(user, client_event_id),))

    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool:
        """True the first time ``user`` sends ``client_event_id`` within ``ttl_s`` seconds
        (idempotent plain feedback); False for a repeat. Ids are per user."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self.db.transaction() as conn:
            return self.claim_in(conn, Claim("client", str(user), str(client_event_id), ttl_s=ttl_s))

    def note_rejected(self, user: str, query: str, item: int, ttl_s: float) -> None:
        """``user`` rejected catalog ``item`` of ``query``: :meth:`rejected` lists it for ``ttl_s`` seconds."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO rejected(user, query, item, expires) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(user, query, item) DO UPDATE SET expires = excluded.expires",
                         (str(user), str(query), int(item), self.clock() + ttl_s))

    def rejected(self, user: str, query: str) -> set[int]:
        """The catalog items of ``query`` that ``user`` rejected within their ttl."""
        rows = self.db.conn.execute("SELECT item FROM rejected WHERE user = ? AND query = ? AND expires > ?",
                                    (str(user), str(query), self.clock())).fetchall()
        return {r[0] for r in rows}

    def forget_rejected(self, user: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM rejected WHERE user = ?", (str(user),))

    def purge(self) -> int:
        """Delete expired events, their claims and expired client ids; returns events deleted."""
        now = self.clock()
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM claims WHERE event_id IN (SELECT event_id FROM events WHERE expires <= ?)", (now,))
            n = conn.execute("DELETE FROM events WHERE expires <= ?", (now,)).rowcount
            conn.execute("DELETE FROM client_events WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM rejected WHERE expires <= ?", (now,))
        return n
