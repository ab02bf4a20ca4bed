"""Export the service's event log to a partitioned Parquet dataset: one row per served slate.

``python -m streamml.loop export source.path=streamml.db out=exports/events`` (``configs/loop/export.yaml``);
from Redis ``source=redis source.url=redis://host:6379/0 source.prefix=streamml`` (add
``source.cluster=true`` for a Redis Cluster, the URL of any node): ``configs/loop/source/``.

Why Parquet, why this shape: off-policy evaluation and retraining read whole columns
(propensities, rewards) of millions of slates; Arrow data partitioned by day is what any
engine (pandas, DuckDB, Dask, Spark) reads one partition at a time.

**Schema** (version :data:`SCHEMA_VERSION`, also stored in each file's metadata and in
``_export_state.json``), one row per impression (a served slate):

==================  ==============================  =============================================
column              type                            meaning
==================  ==============================  =============================================
event_id            string                          the service's event id (rank response)
user                string                          the user the slate was served to
query               string                          the query
created             float64                         rank time, epoch seconds (UTC)
policy              string                          slate policy name (``epsilon_slots`` ...)
bucket              string                          A/B bucket
head                string                          fingerprint (12 hex) of the head that scored it
raw_candidates      bool                            candidates were raw embeddings: ``items`` are
                                                    indices into the request, not catalog ids
items               list<int64>                     shown items in display order
positions           list<int32>                     their positions (0 = top)
propensities        list<float64>                   logging P(item at that position)
rewards             list<struct<item: int64,        one entry per rewarded shown item; ``label``
                    position: int32, label: int8,   1 accepted, 0 rejected; ``label``/``time`` are
                    time: float64>>                 null when the log does not keep them (below)
n_rewards           int32                           ``len(rewards)``; 0: no reward in the window
schema_version      int32                           :data:`SCHEMA_VERSION`
date                string (partition)              ``YYYY-MM-DD`` of ``created`` (UTC); the
                                                    folder ``date=YYYY-MM-DD``
==================  ==============================  =============================================

An event with no reward is exported with ``rewards = []`` and ``n_rewards = 0``, never dropped:
its unshown alternatives and zero accepts are what off-policy estimates are made of.

**Settled events only.** An event is exported once its reward window has closed
(``created <= now - settle_s``, ``settle_s`` = the service's ``events.window_s``): before that a
reward may still come, and an exported "no reward" would be wrong forever. Events are kept by
the service for ``events.retention_s`` only, so export at least that often.

**Chunks and resuming.** Settled events are read in ``(created, event_id)`` order, ``chunk``
at a time; each chunk is written as one file per date partition (``part-<chunk>.parquet``, via a
temporary name and a rename), then ``_export_state.json`` records the cursor. A rerun continues
after the cursor; a run killed between the two rewrites the same file names, so nothing is
duplicated.

**Rewards.** Each reward's claim keeps its label and time (:class:`streamml.stores.events.Claim`),
so ``label`` and ``time`` are filled. A log written before claims kept them (a SQLite ``claims``
table without those columns, a Redis claim holding ``1``) exports them as null.

**Sources** (:class:`Source`: ``count``, ``chunks``, ``close``, ``path``), read-only, each giving the
same rows for the same log (``tests/loop/test_export_sources.py``):

- :class:`SQLiteSource` reads the ``events`` and ``claims`` tables of the service's file.
- :class:`RedisSource` reads Redis or a Redis Cluster. Each event is indexed by ``created`` in a sorted
  set of its hash slot (:class:`~streamml.stores.redis_events.RedisEventLog`, in the slot of its
  user, so a master down takes only its own users' records). The source merges the slots' indexes
  by ``(created, event_id)``, then reads each chunk's records and claims with one MGET each (per node
  in a cluster). An index entry whose event expired meanwhile is skipped. Events created before
  the index existed (an older service) are not in it: they are not exported from Redis.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["SCHEMA_VERSION", "SCHEMA", "Source", "SQLiteSource", "RedisSource", "export", "read_state"]

SCHEMA_VERSION = 1
REWARD = pa.struct([("item", pa.int64()), ("position", pa.int32()), ("label", pa.int8()), ("time", pa.float64())])
SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user", pa.string()), ("query", pa.string()), ("created", pa.float64()),
    ("policy", pa.string()), ("bucket", pa.string()), ("head", pa.string()), ("raw_candidates", pa.bool_()),
    ("items", pa.list_(pa.int64())), ("positions", pa.list_(pa.int32())), ("propensities", pa.list_(pa.float64())),
    ("rewards", pa.list_(REWARD)), ("n_rewards", pa.int32()), ("schema_version", pa.int32()), ("date", pa.string()),
], metadata={"streamml.schema_version": str(SCHEMA_VERSION)})
STATE = "_export_state.json"


@dataclass
class Event:
    """One settled event as the source stores it."""

    event_id: str
    created: float
    record: dict
    rewards: list[tuple[int, int | None, float | None]]  # (item, label, time)


@runtime_checkable
class Source(Protocol):
    """Where :func:`export` reads settled events: ``path`` names it (in errors and the state file).
    Every source yields the same events the same way, which ``tests/loop/test_export_sources.py``
    checks: same log, same Parquet rows."""

    path: object

    def count(self, after: tuple[float, str], until: float) -> int: ...
    def chunks(self, after: tuple[float, str], until: float, size: int) -> Iterator[list[Event]]: ...
    def close(self) -> None: ...


class SQLiteSource:
    """Settled events of the service's SQLite file, read-only, in ``(created, event_id)`` order.

    Reads the tables of :class:`streamml.stores.sqlite_events.SQLiteEventLog` (``events``,
    ``claims``) directly: the event log's interface has no scan, and export must not take the
    service's write lock.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no SQLite event log at {self.path}")
        self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "events" not in tables:
            raise ValueError(f"{self.path} has no 'events' table: is it the service's database (backend.path)?")
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(claims)")} if "claims" in tables else set()
        self._claims = "claims" in tables
        self._labels = {"label", "time"} <= columns

    def count(self, after: tuple[float, str], until: float) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM events WHERE (created, event_id) > (?, ?) AND created <= ?",
                                 (*after, until)).fetchone()[0]

    def chunks(self, after: tuple[float, str], until: float, size: int) -> Iterator[list[Event]]:
        """Events with ``(created, event_id) > after`` and ``created <= until``, ``size`` at a time."""
        while True:
            rows = self.conn.execute(
                "SELECT event_id, created, record FROM events WHERE (created, event_id) > (?, ?) AND created <= ? "
                "ORDER BY created, event_id LIMIT ?", (*after, until, size)).fetchall()
            if not rows:
                return
            rewards = self._rewards([r[0] for r in rows])
            out = []
            for event_id, created, text in rows:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}, events row {event_id!r}: the record is not JSON ({err})") from None
                out.append(Event(event_id, float(created), record, rewards.get(event_id, [])))
            yield out
            after = (float(rows[-1][1]), rows[-1][0])

    def _rewards(self, ids: list[str]) -> dict[str, list]:
        if not self._claims:
            return {}
        cols = "event_id, item, label, time" if self._labels else "event_id, item, NULL, NULL"
        marks = ",".join("?" * len(ids))
        out: dict[str, list] = {}
        for event_id, item, label, t in self.conn.execute(f"SELECT {cols} FROM claims WHERE event_id IN ({marks})", ids):
            out.setdefault(event_id, []).append((json.loads(item), label, t))
        return out

    def close(self) -> None:
        self.conn.close()


class RedisSource:
    """Settled events of the service's Redis or Redis Cluster, in ``(created, event_id)`` order.

    Reads the slots' time indexes of :class:`streamml.stores.redis_events.RedisEventLog` (merged by
    ``(created, event_id)``), then each chunk's records and their rewards' claims in one MGET each
    (per node in a cluster). Read-only. An indexed event that expired meanwhile is skipped.

    ``url``, ``cluster`` and ``prefix`` are the service's (``configs/serve/backend/redis.yaml``);
    ``client`` (a ``redis.Redis`` or ``RedisCluster``) replaces ``url``.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", cluster: bool = False, prefix: str = "streamml",
                 timeout_s: float = 10.0, client=None):
        from streamml.stores.redis import RedisEventLog, connect

        if client is None:
            if cluster and url.startswith("redis://"):
                url = "redis-cluster://" + url[len("redis://"):]
            client = connect(url, timeout_s)
        self.log = RedisEventLog(client, prefix)
        self.path = f"{url} (prefix {self.log.prefix})"

    def count(self, after: tuple[float, str], until: float) -> int:
        return self.log.count_settled(after, until)

    def chunks(self, after: tuple[float, str], until: float, size: int) -> Iterator[list[Event]]:
        entries = self.log.settled(after, until, page=min(size, 1000))
        while True:
            batch = list(islice(entries, size))
            if not batch:
                return
            ids = [event_id for _, event_id in batch]
            records = self.log.records(ids)
            found = [(c, e, r) for (c, e), r in zip(batch, records) if r is not None]
            rewards = self.log.rewards_of([(e, r) for _, e, r in found])
            events = [Event(e, c, r, [tuple(x) for x in rw]) for (c, e, r), rw in zip(found, rewards)]
            if events:
                yield events

    def close(self) -> None:
        self.log.client.close()


def _row(ev: Event, source: str) -> dict:
    """An event as a row of :data:`SCHEMA`; a record missing a field is an error naming the event."""
    rec = ev.record
    try:
        shown = [int(i) for i in rec["shown"]]
        props = [float(p) for p in rec["propensities"]]
        user, query = str(rec["user"]), str(rec["query"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}, event {ev.event_id!r}: not a served slate ({type(err).__name__}: {err})") from None
    if len(shown) != len(props):
        raise ValueError(f"{source}, event {ev.event_id!r}: {len(shown)} shown items but {len(props)} propensities")
    position = {item: p for p, item in enumerate(shown)}
    rewards = []
    for item, label, t in sorted(ev.rewards, key=lambda r: position.get(r[0], len(shown))):
        if item not in position:
            raise ValueError(f"{source}, event {ev.event_id!r}: a reward names item {item!r}, which was not shown")
        rewards.append({"item": int(item), "position": position[item],
                        "label": None if label is None else int(label), "time": None if t is None else float(t)})
    return {"event_id": ev.event_id, "user": user, "query": query, "created": ev.created,
            "policy": rec.get("policy"), "bucket": rec.get("bucket"), "head": rec.get("model"),
            "raw_candidates": "vectors" in rec, "items": shown, "positions": list(range(len(shown))),
            "propensities": props, "rewards": rewards, "n_rewards": len(rewards), "schema_version": SCHEMA_VERSION,
            "date": datetime.fromtimestamp(ev.created, timezone.utc).strftime("%Y-%m-%d")}


def read_state(out: str | Path) -> dict:
    """The export's cursor: ``{"after": [created, event_id], "chunks": n, "rows": n, "schema_version": v}``."""
    path = Path(out) / STATE
    if not path.exists():
        return {"after": [float("-inf"), ""], "chunks": 0, "rows": 0, "schema_version": SCHEMA_VERSION}
    state = json.loads(path.read_text())
    if state.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: written with schema version {state.get('schema_version')}, this code writes "
                         f"{SCHEMA_VERSION}; export to a new folder")
    return state


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / STATE)


def _write_chunk(out: Path, rows: list[dict], chunk: int) -> None:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    for date in sorted(set(table.column("date").to_pylist())):
        part = table.filter(pc.equal(table.column("date"), date)).drop_columns(["date"])
        folder = out / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".part-{chunk:06d}.parquet.tmp"
        pq.write_table(part, tmp)
        os.replace(tmp, folder / f"part-{chunk:06d}.parquet")


def export(source, out: str | Path, chunk: int = 10_000, settle_s: float = 600.0, now: float | None = None,
           max_chunks: int | None = None, progress: bool = True) -> dict:
    """Export ``source``'s settled events after the saved cursor into ``out``; returns the new state.

    ``max_chunks`` stops after that many chunks (a bounded run; the next one resumes).
    """
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    until = (time.time() if now is None else now) - float(settle_s)
    after = (float(state["after"][0]), str(state["after"][1]))
    name = str(getattr(source, "path", source))
    with tqdm(total=source.count(after, until), unit="event", desc="export", disable=not progress) as bar:
        for n, events in enumerate(source.chunks(after, until, chunk)):
            if max_chunks is not None and n >= max_chunks:
                break
            _write_chunk(out, [_row(ev, name) for ev in events], state["chunks"])
            state = {"after": [events[-1].created, events[-1].event_id], "chunks": state["chunks"] + 1,
                     "rows": state["rows"] + len(events), "schema_version": SCHEMA_VERSION, "source": name}
            _write_state(out, state)
            bar.update(len(events))
    return state
