"""Every export source reads the same log the same way: the same events written to SQLite, Redis and a
Redis Cluster (through the event log's own API) export to the same Parquet rows; and the service's
own Redis log (ranks and rewards through HTTP) exports each reward with its label and time."""

from __future__ import annotations

import time
import uuid

import pyarrow.dataset as ds
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from streamml.loop.__main__ import export as export_main
from streamml.loop.export import RedisSource, Source, SQLiteSource, export
from streamml.serve.app import create_app
from streamml.stores import SQLiteEventLog
from tests.serve.serve_helpers import REPO, serve_cfg
from tests.stores.conformance import assert_conforms

N = 14


def _write(logs, ids: list[str], base: float) -> None:
    """The same 14 events in every log: two users, created in ties of four (two per user, so two per
    slot), slates of three, rewards with and without their label and time, events with none."""
    for n, event_id in enumerate(ids):
        record = {"user": f"u{n % 2}", "query": f"q{n % 3}", "created": base + n // 4, "model": "abc123",
                  "bucket": "main", "policy": "epsilon_slots", "shown": [n, n + 1, n + 2],
                  "propensities": [0.9, 0.5, 0.25]}
        for log in logs:
            log.create(event_id, record, ttl_s=3600)
            if n % 3 == 0:
                assert log.claim(event_id, n + 2, label=1, time=base + n + 0.5)
                assert log.claim(event_id, n, label=0, time=base + n + 0.25)
            if n == 4:
                assert log.claim(event_id, n + 1)  # a claim without its reward


def _rows(out) -> list[dict]:
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["created"], r["event_id"]))


@pytest.fixture(params=["redis", "redis-cluster"])
def both(request, tmp_path):
    """``(SQLite source, Redis source, event ids)`` over the same log."""
    server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
    from streamml.stores.redis import RedisEventLog

    prefix = f"t{uuid.uuid4().hex[:8]}"
    redis_log, sqlite_log = RedisEventLog(server.client(), prefix), SQLiteEventLog(tmp_path / "serve.db")
    ids = [redis_log.new_event_id(f"u{n % 2}") for n in range(N)]
    _write([redis_log, sqlite_log], ids, time.time() - 1000)
    cluster = request.param == "redis-cluster"
    port = (server.nodes[0] if cluster else server).port
    url = f"redis://127.0.0.1:{port}/0"
    yield SQLiteSource(tmp_path / "serve.db"), RedisSource(url, cluster=cluster, prefix=prefix), ids, (url, cluster, prefix)


def test_sqlite_and_redis_export_the_same_rows(both, tmp_path):
    sqlite_src, redis_src, ids, _ = both
    for src in (sqlite_src, redis_src):
        assert_conforms(src, Source)
        assert src.count((float("-inf"), ""), time.time()) == N
    export(sqlite_src, tmp_path / "a", settle_s=0, progress=False)
    export(redis_src, tmp_path / "b", chunk=3, settle_s=0, progress=False)  # chunks that split ties of created
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(a) == N and a == b
    by_id = {r["event_id"]: r for r in b}
    assert [(x["item"], x["position"], x["label"], x["time"]) for x in by_id[ids[3]]["rewards"]] == [
        (3, 0, 0, pytest.approx(b[0]["created"] + 3.25)), (5, 2, 1, pytest.approx(b[0]["created"] + 3.5))]
    assert [(x["item"], x["label"], x["time"]) for x in by_id[ids[4]]["rewards"]] == [(5, None, None)]


def test_a_redis_export_resumes_after_its_cursor(both, tmp_path):
    _, redis_src, ids, _ = both
    out = tmp_path / "out"
    state = export(redis_src, out, chunk=1, settle_s=0, max_chunks=5, progress=False)
    assert state["rows"] == 5
    assert redis_src.count(tuple(state["after"]), time.time()) == N - 5
    state = export(redis_src, out, chunk=2, settle_s=0, progress=False)
    assert state["rows"] == N
    rows = _rows(out)
    assert sorted(r["event_id"] for r in rows) == sorted(ids) and len({r["event_id"] for r in rows}) == N
    assert [(r["created"], r["event_id"]) for r in rows] == sorted((r["created"], r["event_id"]) for r in rows)


def _rows_of(src, tmp_path):
    export(src, tmp_path / "all", settle_s=0, progress=False)
    return _rows(tmp_path / "all")


def test_only_settled_redis_events_are_exported(both, tmp_path):
    _, redis_src, ids, _ = both
    created = sorted({r["created"] for r in _rows_of(redis_src, tmp_path)})
    state = export(redis_src, tmp_path / "settled", settle_s=600, now=created[1] + 600, progress=False)
    assert state["rows"] == 8  # the events of the first two times of creation, four each


def test_an_expired_event_is_skipped(both, tmp_path):
    _, redis_src, ids, _ = both
    log = redis_src.log
    log.client.delete(log._key(ids[0]))  # as its TTL would: the index entry stays until the next trim
    rows = _rows_of(redis_src, tmp_path)
    assert len(rows) == N - 1 and ids[0] not in {r["event_id"] for r in rows}


def test_the_hydra_entry_exports_from_redis(both, tmp_path):
    _, _, _, (url, cluster, prefix) = both
    with initialize_config_dir(config_dir=str(REPO / "configs" / "loop"), version_base="1.3"):
        cfg = compose("export", overrides=["source=redis", f"source.url={url}", f"source.cluster={cluster}",
                                           f"source.prefix={prefix}", f"out={tmp_path / 'out'}", "settle_s=0",
                                           "progress=false"])
    assert export_main(cfg)["rows"] == N


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_the_services_redis_log_exports_its_rewards(kind, request, served_models, tmp_path):
    """Ranks and rewards through HTTP on Redis (the service's claimed updates), then the export."""
    server = request.getfixturevalue("redis_server" if kind == "redis" else "redis_cluster")
    cluster = kind == "redis-cluster"
    url, prefix = f"redis://127.0.0.1:{(server.nodes[0] if cluster else server).port}/0", f"t{uuid.uuid4().hex[:8]}"
    cfg = serve_cfg(*served_models[:2], backend="redis")
    with open_dict(cfg):
        cfg.backend.url, cfg.backend.cluster, cfg.backend.prefix = url, cluster, prefix
    given = {}
    with TestClient(create_app(cfg)) as client:
        for n in range(6):
            r = client.post("/v1/rank", json={"user": f"u{n % 3}", "query": "topic_0", "k": 3})
            assert r.status_code == 200, r.text
            ranked = r.json()
            if n % 2 == 0:
                items = [ranked["items"][p]["item"] for p in (0, 2)]
                body = {"rewards": [{"item": items[0], "label": "rejected"}, {"item": items[1], "label": "accepted"}]}
                assert client.post(f"/v1/events/{ranked['event_id']}/reward", json=body).json()["applied"] == 2
                given[ranked["event_id"]] = [(items[0], 0, 0), (items[1], 2, 1)]
            else:
                given[ranked["event_id"]] = []
    assert export(RedisSource(url, cluster=cluster, prefix=prefix), tmp_path / "out", settle_s=0, progress=False)["rows"] == 6
    rows = _rows(tmp_path / "out")
    assert {r["event_id"]: [(x["item"], x["position"], x["label"]) for x in r["rewards"]] for r in rows} == given
    assert all(r["created"] <= x["time"] <= time.time() for r in rows for x in r["rewards"])
