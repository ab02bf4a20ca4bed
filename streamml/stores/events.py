"""What every event log and item catalog provides, the one catalog loader, and the in-memory ones.

A :class:`Claim` is the right to apply one update once: the first reward of an item shown
in an event, or the first feedback of a caller's own event id. A client event id means the
same on every backend: it is **per user** (user B reusing user A's id is B's first use, not
a duplicate). On Redis the claim must share the slot of the user's state, so it cannot be
global there; the other backends follow, so that no backend silently drops feedback that
another would apply.

:class:`EventLog` and :class:`Catalog` are the Protocols of ``tests/stores/test_events_and_items.py``,
which runs every implementation (memory, SQLite, Redis, Redis Cluster) against them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np

from streamml.stores.codec import encode_key, to_json

__all__ = ["Claim", "Reward", "EventLog", "shown_rewards", "Catalog", "CatalogRows", "read_catalog", "MemoryEventLog", "MemoryCatalog"]


@dataclass(frozen=True)
class Claim:
    """One update that must be applied at most once.

    ``kind="event"``: the reward of ``item`` shown in event ``ident`` (it lives as long as the
    event). ``kind="client"``: plain feedback with the caller's event id ``ident``, remembered
    ``ttl_s`` seconds. ``user`` owns the claim: client ids are first-wins per user, and on Redis
    the claim's key carries the user's hash tag so it commits with the user's state.

    A reward's claim also keeps the reward: its ``label`` (1 accepted, 0 rejected) and ``time``
    (epoch seconds), so the log alone says what each user did with each slate
    (:meth:`EventLog.rewards`, the export of :mod:`streamml.loop.export`, the replay). The claim
    is the one record written, once, in the transaction of the update it guards; storing the
    reward anywhere else could disagree with it after a crash.
    """

    kind: Literal["event", "client"]
    user: str
    ident: str
    item: int | None = None
    ttl_s: float | None = None
    label: int | None = None
    time: float | None = None

    def __post_init__(self):
        if self.label not in (None, 0, 1):
            raise ValueError(f"a claim's label is 1 (accepted), 0 (rejected) or None, got {self!r}")
        if self.kind == "event" and self.item is None:
            raise ValueError(f"an event claim names the shown item, got {self!r}")
        if self.kind == "client" and (self.ttl_s is None or self.ttl_s <= 0):
            raise ValueError(f"a client claim needs a positive ttl_s, got {self!r}")
        if self.kind not in ("event", "client"):
            raise ValueError(f"claim kind must be 'event' or 'client', got {self.kind!r}")


class Reward(NamedTuple):
    """A claimed reward of an event, as :meth:`EventLog.rewards` reads it back: ``label`` and
    ``time`` are None for a claim made without them (or before the log kept them)."""

    item: Hashable
    label: int | None
    time: float | None


def item_key(item: Hashable) -> str:
    """:func:`~streamml.stores.codec.encode_key` of a claimed item, with the fast path of a plain int
    (an export reads every shown item of millions of events)."""
    return str(item) if type(item) is int else encode_key(item, "claim item")


def shown_rewards(record: Mapping | None, claims: Mapping[str, tuple]) -> list[Reward]:
    """The rewards of an event's shown items (``record["shown"]``) among ``claims`` (encoded item ->
    (label, time)), in display order: what every backend's ``rewards`` returns. Only shown items
    can be rewarded (the service refuses others), and Redis finds a claim by its item's key."""
    if record is None:
        return []
    out = []
    for item in record.get("shown", []):
        hit = claims.get(item_key(item))
        if hit is not None:
            out.append(Reward(item, *hit))
    return out


@runtime_checkable
class EventLog(Protocol):
    """Served events, first-wins reward claims and per-user client event ids, with expiry.

    ``claim(event_id, item, label, time)`` keeps the reward's label and time with the claim;
    ``rewards(event_id)`` reads them back for the event's shown items (``record["shown"]``),
    in display order."""

    def new_event_id(self, user: str) -> str: ...
    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None: ...
    def get(self, event_id: str) -> dict | None: ...
    def claim(self, event_id: str, item: Hashable, label: int | None = None, time: float | None = None) -> bool: ...
    def rewards(self, event_id: str) -> list[Reward]: ...
    def release(self, event_id: str, item: Hashable) -> None: ...
    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool: ...
    def release_client_event(self, user: str, client_event_id: str) -> None: ...
    def note_rejected(self, user: str, query: str, item: int, ttl_s: float) -> None: ...
    def rejected(self, user: str, query: str) -> set[int]: ...
    def forget_rejected(self, user: str) -> None: ...


@runtime_checkable
class Catalog(Protocol):
    """Each query's items (global ids, texts, embeddings), loaded from a folder of query files."""

    def load_folder(self, folder: str | Path, embedding_dim: int = 384) -> int: ...
    def queries(self) -> list[str]: ...
    def items(self, query: str) -> tuple[np.ndarray, list[str], np.ndarray]: ...
    def all(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]: ...


class CatalogRows(NamedTuple):
    """A folder of query files as every catalog stores it: item ids are the rows of
    :func:`streamml.data.load_queries` (the online learner's catalog ids for the same folder)."""

    ids: np.ndarray  # (N,) int64
    queries: list[str]  # (N,) query of each item
    texts: list[str]
    X: np.ndarray  # (N, D) float32
    query_ids: list[str]  # in file order
    fingerprint: str

    def of(self, query: str) -> np.ndarray:
        """Rows of one query."""
        return np.flatnonzero(np.asarray(self.queries, dtype=object) == query)


def read_catalog(folder: str | Path, embedding_dim: int = 384) -> CatalogRows:
    """The one catalog loader: a folder of query files, validated, duplicates merged."""
    from streamml.data import load_queries  # pandas: only needed when loading

    data = load_queries(folder, embedding_dim=embedding_dim, min_per_class=0)  # serving needs no minimum
    X = np.ascontiguousarray(data.X, np.float32)
    return CatalogRows(np.arange(len(X), dtype=np.int64), data.frame["query_id"].tolist(), data.frame["text"].tolist(),
                       X, list(data.query_ids), data.fingerprint)


class MemoryEventLog:
    """The event log in dicts (one process): the contract of every event log."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._events: dict[str, tuple[str, float]] = {}
        self._claims: dict[tuple[str, str], tuple[int | None, float | None]] = {}
        self._client: dict[tuple[str, str], float] = {}
        self._rejected: dict[str, dict[tuple[str, int], float]] = {}

    def new_event_id(self, user: str) -> str:
        return uuid.uuid4().hex

    def create(self, event_id: str, record: Mapping, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self.clock()
        rec = dict(record)
        rec.setdefault("created", now)
        text = to_json(rec)  # as the durable logs store it: the same TypeError, and get() returns copies
        with self._lock:
            old = self._events.get(event_id)
            if old is not None and old[1] > now:
                raise ValueError(f"event {event_id!r} already exists")
            if old is not None:  # an expired id is reused with fresh claims
                self._claims = {c: v for c, v in self._claims.items() if c[0] != event_id}
            self._events[event_id] = (text, now + ttl_s)

    def get(self, event_id: str) -> dict | None:
        hit = self._events.get(event_id)
        return json.loads(hit[0]) if hit and hit[1] > self.clock() else None

    def claim(self, event_id: str, item: Hashable, label: int | None = None, time: float | None = None) -> bool:
        key = (event_id, encode_key(item, "claim item"))
        with self._lock:
            hit = self._events.get(event_id)
            if hit is None or hit[1] <= self.clock():
                raise KeyError(f"unknown or expired event {event_id!r}")
            if key in self._claims:
                return False
            self._claims[key] = (label, time)
            return True

    def rewards(self, event_id: str) -> list[Reward]:
        with self._lock:
            claims = {item: v for (e, item), v in self._claims.items() if e == event_id}
        return shown_rewards(self.get(event_id), claims)

    def release(self, event_id: str, item: Hashable) -> None:
        with self._lock:
            self._claims.pop((event_id, encode_key(item, "release item")), None)

    def claim_client_event(self, user: str, client_event_id: str, ttl_s: float) -> bool:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self._lock:
            now, key = self.clock(), (str(user), str(client_event_id))
            if self._client.get(key, 0.0) > now:
                return False
            self._client[key] = now + ttl_s
            return True

    def release_client_event(self, user: str, client_event_id: str) -> None:
        with self._lock:
            self._client.pop((str(user), str(client_event_id)), None)

    def note_rejected(self, user: str, query: str, item: int, ttl_s: float) -> None:
        """``user`` rejected catalog ``item`` of ``query``: :meth:`rejected` lists it for ``ttl_s`` seconds."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        with self._lock:
            self._rejected.setdefault(str(user), {})[(str(query), int(item))] = self.clock() + ttl_s

    def rejected(self, user: str, query: str) -> set[int]:
        """The catalog items of ``query`` that ``user`` rejected within their ttl."""
        now = self.clock()
        return {i for (q, i), t in self._rejected.get(str(user), {}).copy().items() if q == str(query) and t > now}

    def forget_rejected(self, user: str) -> None:
        with self._lock:
            self._rejected.pop(str(user), None)

    def claim_of(self, claim: Claim) -> bool:
        """Win ``claim`` (KeyError: its event is unknown or expired)."""
        if claim.kind == "event":
            return self.claim(claim.ident, claim.item, claim.label, claim.time)
        return self.claim_client_event(claim.user, claim.ident, claim.ttl_s)

    def release_of(self, claim: Claim) -> None:
        if claim.kind == "event":
            self.release(claim.ident, claim.item)
        else:
            self.release_client_event(claim.user, claim.ident)


class MemoryCatalog:
    """The item catalog in memory; a reload replaces it."""

    def __init__(self):
        self._rows: CatalogRows | None = None

    def load_folder(self, folder: str | Path, embedding_dim: int = 384) -> int:
        self._rows = read_catalog(folder, embedding_dim)
        return len(self._rows.ids)

    @property
    def fingerprint(self) -> str | None:
        return None if self._rows is None else self._rows.fingerprint

    def queries(self) -> list[str]:
        return [] if self._rows is None else list(self._rows.query_ids)

    def items(self, query: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        rows = np.zeros(0, np.int64) if self._rows is None else self._rows.of(query)
        if not len(rows):
            raise KeyError(f"unknown query {query!r}; the catalog has {self.queries()}")
        c = self._rows
        return c.ids[rows].copy(), [c.texts[i] for i in rows], c.X[rows].copy()

    def all(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        if self._rows is None:
            return np.zeros(0, np.int64), [], [], np.zeros((0, 0), np.float32)
        c = self._rows
        return c.ids.copy(), list(c.queries), list(c.texts), c.X.copy()
