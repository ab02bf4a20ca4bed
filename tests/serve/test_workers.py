"""The real service (``python -m streamml.serve``, 2 uvicorn workers) on SQLite and on Redis:
concurrent rewards for one user, SIGKILL under load, Redis going away and coming back.

Every check compares the stored residual with a replay of the same events in one process:
with a small learning rate an update's effect hardly depends on the order of the events,
so the stored residual equals the replay only if every update was applied exactly once
(a lost or doubled update moves it by a whole step, far more than the tolerance).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hydra.utils import instantiate

from streamml.serve.lifecycle import Lifecycle
from tests.helpers import free_port, wait_until, wait_until_answering
from tests.serve.serve_helpers import REPO, serve_cfg
from tests.stores.redis_fixtures import RedisServer, need_redis

pytestmark = pytest.mark.slow
QUERY = "topic_0"
LEARNING = ["rule.lr=0.001", "online.dtype=float32"]  # tiny steps: the order of events hardly matters


class Server:
    """``python -m streamml.serve`` in its own process group (SIGKILL reaches every worker)."""

    def __init__(self, log_path, overrides, workers=2):
        self.port, self.overrides, self.workers, self.log_path = free_port(), list(overrides), workers, log_path
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=240.0) -> "Server":
        log = open(self.log_path, "ab")
        args = [sys.executable, "-m", "streamml.serve", f"port={self.port}", f"workers={self.workers}",
                "log_level=warning", *self.overrides]
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=log, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            wait_until_answering(self.proc, f"{self.url}/readyz", self.log_path, timeout)
        except AssertionError:
            self.kill()
            raise
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def setup(request, served_models, tmp_path_factory):
    """(the running service, its config), one per backend.

    The two tests of a backend share the service (starting two workers takes about 10 s); each
    uses its own user. The SIGKILL test leaves it restarted and running."""
    items_dir, tracking_uri, _ = served_models
    tmp_path = tmp_path_factory.mktemp(f"workers_{request.param}")
    if request.param == "sqlite":
        backend_overrides = [f"backend.path={tmp_path / 'serve.db'}"]
    else:
        server = request.getfixturevalue("redis_server")
        backend_overrides = ["serve/backend@backend=redis", f"backend.url=redis://127.0.0.1:{server.port}/0",
                             f"backend.prefix=w{uuid.uuid4().hex[:8]}"]
    overrides = [f"items_dir={items_dir}", f"tracking_uri={tracking_uri}", *LEARNING, *backend_overrides]
    cfg = serve_cfg(items_dir, tracking_uri, overrides=[*LEARNING, *backend_overrides], backend=request.param)
    service = Server(tmp_path / "serve.log", overrides).start()
    yield service, cfg
    service.kill(signal.SIGTERM)


@pytest.fixture
def running(setup):
    """``setup``'s service, started again if an earlier test left it dead (so a failure stays its own)."""
    service, cfg = setup
    if service.proc is None or service.proc.poll() is not None:
        service.start()
    return service, cfg


def replay_check(cfg, user, events):
    """The stored residual of (user, QUERY) against a one-process replay of ``events`` [(item, label)]."""
    backend = instantiate(cfg.backend)
    try:
        lifecycle = Lifecycle(backend, instantiate(cfg.online), cfg.tracking_uri)
        prepared = lifecycle.prepare(backend.control.get()["uri"])
        stored = lifecycle.activate(prepared).learner.store.get_many([(user, QUERY)])["residual"][0]
    finally:
        backend.close()  # stops the SQLite checkpointer thread, which a later fork must not inherit
    local = instantiate(cfg.online)(items=prepared.X, item_query=prepared.item_query, head_scores=prepared.head_scores)
    steps = []
    for item, label in events:
        before = local.store.get_many([(user, QUERY)])["residual"][0].astype(np.float64)
        local.learn_one(user, QUERY, prepared.queries[QUERY].rows[0] + item, label)  # topic_0's ids are its rows
        steps.append(np.linalg.norm(local.store.get_many([(user, QUERY)])["residual"][0] - before))
    expected = local.store.get_many([(user, QUERY)])["residual"][0]
    gap = float(np.linalg.norm(stored.astype(np.float64) - expected))
    assert gap < 0.25 * min(steps), f"stored residual is {gap:.2e} from the replay; one step is >= {min(steps):.2e}"


def _rewards_applied(server) -> float:
    """``streamml_updates_applied_total{source="reward"}``, summed over both workers."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith('streamml_updates_applied_total{source="reward"}'):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_rewards_for_one_user_apply_exactly_once_each(running):
    server, cfg = running
    user, n = f"u{uuid.uuid4().hex[:6]}", 40
    applied_before = _rewards_applied(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        shown = [c.post("/v1/rank", json={"user": user, "query": QUERY, "k": 3}).json() for _ in range(n)]
    rewards = [(ev["event_id"], ev["items"][0]["item"], i % 2) for i, ev in enumerate(shown)]

    def send(job):
        event_id, item, label = job
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post(f"/v1/events/{event_id}/reward",
                       json={"rewards": [{"item": item, "label": "accepted" if label else "rejected"}]})
            assert r.status_code == 200, r.text
            return r.json()["results"][0]["status"]

    with ThreadPoolExecutor(16) as pool:  # every reward twice, concurrently: one applies, one is a duplicate
        statuses = list(pool.map(send, rewards + rewards))
    per_event = {}
    for (event_id, _, _), status in zip(rewards + rewards, statuses):
        per_event.setdefault(event_id, []).append(status)
    assert all(sorted(s) == ["applied", "duplicate"] for s in per_event.values()), per_event
    assert _rewards_applied(server) - applied_before == n
    replay_check(cfg, user, [(item, label) for _, item, label in rewards])


def test_sigkill_under_load_loses_no_acknowledged_update(running):
    server, cfg = running
    user, n = f"k{uuid.uuid4().hex[:6]}", 240
    events = [(f"{user}-{i}", i % 40, int(i % 3 == 0)) for i in range(n)]
    acked: set[str] = set()

    def send(client, job):
        event_id, item, label = job
        try:
            r = client.post("/v1/feedback", timeout=10, json={
                "user": user, "query": QUERY, "item": item, "label": "accepted" if label else "rejected", "event_id": event_id})
        except httpx.HTTPError:
            return None
        if r.status_code == 200:
            acked.add(event_id)
            return r.json()["status"]
        return None

    # no keep-alive under load: each request a new connection, spread over both workers as the kernel accepts them
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    with ThreadPoolExecutor(6) as pool, httpx.Client(base_url=server.url, limits=no_keepalive) as client:
        futures = [pool.submit(send, client, job) for job in events]
        wait_until(lambda: len(acked) >= n // 3, "a third of the updates acknowledged", 120, every_s=0.01)
        server.kill(signal.SIGKILL)
        first = [f.result() for f in futures]
    assert 0 < sum(s is not None for s in first) < n
    server.start()
    # the caller retries what was not acknowledged; acknowledged ones must read as duplicates
    with httpx.Client(base_url=server.url) as client:
        second = [send(client, job) for job in events]
    for job, a, b in zip(events, first, second):
        assert b in ("applied", "duplicate"), job
        if a is not None:
            assert b == "duplicate", f"{job} was acknowledged as {a} before the kill, then {b}"
    replay_check(cfg, user, [(item, label) for _, item, label in events])


def test_redis_down_is_a_fast_503_without_partial_writes_and_the_service_recovers(served_models, tmp_path):
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    items_dir, tracking_uri, _ = served_models
    backend = ["serve/backend@backend=redis", f"backend.url=redis://127.0.0.1:{redis.port}/0"]
    overrides = [f"items_dir={items_dir}", f"tracking_uri={tracking_uri}", *LEARNING, *backend]
    cfg = serve_cfg(items_dir, tracking_uri, overrides=[*LEARNING, *backend], backend="redis")
    server = Server(tmp_path / "serve.log", overrides).start()
    user = "r1"
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            def feedback(event_id, item, label):
                return c.post("/v1/feedback", json={"user": user, "query": QUERY, "item": item,
                                                    "label": label, "event_id": event_id})

            assert feedback("a", 1, "accepted").json()["status"] == "applied"
            ev = c.post("/v1/rank", json={"user": user, "query": QUERY, "k": 2}).json()
            redis.stop()
            for request in (lambda: feedback("b", 2, "rejected"),
                            lambda: c.post("/v1/rank", json={"user": user, "query": QUERY, "k": 2}),
                            lambda: c.post(f"/v1/events/{ev['event_id']}/reward",
                                           json={"rewards": [{"item": ev["items"][0]["item"], "label": "accepted"}]}),
                            lambda: c.get(f"/v1/users/{user}")):
                r = request()  # a 503 within the client's timeout; tests/stores/test_redis.py counts the store's connects
                assert r.status_code == 503 and "backend is unavailable" in r.json()["detail"], r.text
            assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
            redis.start()  # same port, same data (AOF)
            assert c.get("/readyz").status_code == 200  # recovered without a restart of its own
            assert feedback("b", 2, "rejected").json()["status"] == "applied"  # "b" was not half-applied or claimed
            assert feedback("a", 1, "accepted").json()["status"] == "duplicate"
            r = c.post(f"/v1/events/{ev['event_id']}/reward",
                       json={"rewards": [{"item": ev["items"][0]["item"], "label": "accepted"}]})
            assert r.json()["applied"] == 1
            assert c.post("/v1/rank", json={"user": user, "query": QUERY, "k": 2}).status_code == 200
            assert 'streamml_store_errors_total' in c.get("/metrics").text
        replay_check(cfg, user, [(1, 1), (2, 0), (ev["items"][0]["item"], 1)])
    finally:
        server.kill(signal.SIGTERM)
        redis.stop()
