"""Connections to Redis or Redis Cluster that fail fast, hash tags, readiness, and small helpers
shared by the state store (:mod:`streamml.stores.redis`) and the event log and catalog
(:mod:`streamml.stores.redis_events`)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

from streamml.stores.errors import StoreUnavailable

__all__ = ["connect", "guard", "health", "is_cluster", "user_tag", "key_tag", "slot_tag", "check_prefix", "dumps", "ms",
           "client_of", "UNAVAILABLE", "CHUNK"]

UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ClusterError)
CHUNK = 1000


def dumps(v) -> str:
    return json.dumps(v, separators=(",", ":"))


def connect(url: str, timeout_s: float = 0.5) -> redis.Redis | RedisCluster:
    """A client that fails fast: ``redis://host:port/db`` or ``redis-cluster://host:port``.

    Socket timeouts of ``timeout_s`` and no automatic retries (a retried EXEC or claim
    could apply twice): the caller sees :class:`StoreUnavailable` at once."""
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    if url.startswith("redis-cluster://"):
        return RedisCluster.from_url("redis://" + url[len("redis-cluster://") :], retry=Retry(NoBackoff(), 0), **opts)
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **opts)


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as e:
        raise StoreUnavailable(f"Redis unavailable during {what}: {type(e).__name__}: {e}") from e


def client_of(client_or_url) -> redis.Redis | RedisCluster:
    return connect(client_or_url) if isinstance(client_or_url, str) else client_or_url


def key_tag(plain) -> str:
    """The hash tag of a plain key: its user (first part), so a user's keys share a slot."""
    return dumps(plain[0] if type(plain) is list and len(plain) >= 2 else plain)


def user_tag(user: str) -> str:
    """The hash tag of a user's keys: what :class:`RedisStore` puts in braces for the keys
    ``user`` and ``(user, query)``."""
    return dumps(str(user))


_SLOT_TAGS: list[str] = []


def slot_tag(slot: int) -> str:
    """A short string whose hash slot is ``slot`` (the shortest hex number that hashes there):
    the hash tag of an event whose id names ``slot``. The table of all 16384 is built once per
    process, on the first event (``experiments/serve_stores_figures.md``)."""
    if not _SLOT_TAGS:
        tags: list[str | None] = [None] * 16384
        i, found = 0, 0
        while found < 16384:
            text = format(i, "x")
            slot_ = key_slot(text.encode())
            if tags[slot_] is None:
                tags[slot_], found = text, found + 1
            i += 1
        _SLOT_TAGS[:] = tags
    return _SLOT_TAGS[slot]


def check_prefix(prefix: str) -> str:
    """A namespace without hash-tag braces or glob characters; a trailing ``:`` is dropped."""
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]*[A-Za-z0-9_.\-]:?", prefix):
        raise ValueError(f"prefix must be letters, digits, '_', '.', '-' or ':', got {prefix!r}")
    return prefix.rstrip(":")


def is_cluster(client) -> bool:
    return isinstance(client, RedisCluster)


def health(client) -> dict:
    """What a request would find: ``{"status": "ready"}``, or on a cluster with some slots
    unserved ``{"status": "degraded", "unreachable": [...], "slots_down": n}``.

    Raises :class:`StoreUnavailable` when no request could succeed: the server (every
    primary of a cluster) is unreachable, or the cluster refuses every key (``cluster_state:fail``,
    what ``cluster-require-full-coverage yes`` does when one slot is down). A cluster with full
    coverage off keeps ``cluster_state:ok`` while some slots are down, so each primary is pinged
    and ``cluster_slots_fail``/``pfail`` read as well.
    """
    if not is_cluster(client):
        with guard("ping"):
            client.ping()
        return {"status": "ready"}
    unreachable, info = [], None
    for node in client.get_primaries():
        try:
            conn = client.get_redis_connection(node)
            conn.ping()
            info = info or conn.execute_command("CLUSTER INFO")
        except UNAVAILABLE:
            unreachable.append(node.name)
    if info is None:
        raise StoreUnavailable(f"Redis Cluster: no primary reachable ({', '.join(unreachable)})")
    info = info if isinstance(info, dict) else dict(
        line.split(":", 1) for line in (info.decode() if isinstance(info, bytes) else info).splitlines() if ":" in line)
    if str(info.get("cluster_state")) != "ok":
        raise StoreUnavailable("Redis Cluster refuses every key (cluster_state:fail); with one master down that is "
                               "cluster-require-full-coverage yes, the service expects no")
    down = 16384 - int(info.get("cluster_slots_ok", 16384))
    if unreachable or down:
        return {"status": "degraded", "unreachable": unreachable, "slots_down": down}
    return {"status": "ready"}


def ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return max(1, int(ttl_s * 1000))
