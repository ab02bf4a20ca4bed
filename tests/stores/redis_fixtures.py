"""Real Redis servers for tests (a pytest plugin, see the root conftest.py): a single server and a 3-master cluster.

Each server runs from ``redis-server`` on a free loopback port, in a temp dir, and
is stopped when the fixture ends. Tests that need one skip (with the reason) only
when ``redis-server`` or the ``redis`` Python package is missing; CI installs both.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def need_redis():
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server/redis-cli not installed (apt-get install redis-server); CI installs it")
    pytest.importorskip("redis", reason="the redis package is in the serve extra: pip install -e '.[serve]'")


class RedisServer:
    """One ``redis-server`` process; ``stop()`` and ``start()`` again keep port and data (AOF)."""

    def __init__(self, directory: Path, port: int | None = None, cluster: bool = False, extra: tuple[str, ...] = ()):
        self.dir, self.cluster, self.extra = Path(directory), cluster, tuple(extra)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(10000 if cluster else None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
        args += list(self.extra)  # later options win
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda c: c.ping())
        return self

    def _wait(self, ok, timeout=20.0):
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            return ok(client)

        wait_until(ready, f"redis-server on port {self.port} to be ready", timeout, retry_on=redis.exceptions.RedisError)

    def client(self, **kwargs):
        import redis

        return redis.Redis(port=self.port, **kwargs)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server shared by the session; tests isolate themselves by key prefix."""
    need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(tmp_path):
    """A redis-server of this test alone (to stop and restart it)."""
    need_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _cluster_ok(client) -> bool:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        return info.get("cluster_state") == "ok"
    return b"cluster_state:ok" in (info if isinstance(info, bytes) else str(info).encode())


class RedisClusterServers:
    """Three ``redis-server --cluster-enabled yes`` masters joined by ``redis-cli --cluster create``;
    ``extra`` options go to every node (e.g. the service's settings, README "Redis Cluster")."""

    def __init__(self, directory: Path, extra: tuple[str, ...] = ()):
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True, extra=extra) for i in range(3)]

    def start(self) -> RedisClusterServers:
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for n in self.nodes:
            n._wait(_cluster_ok, timeout=30)
        return self

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node, as a crash would (no shutdown, no final AOF rewrite)."""
        node.proc.kill()
        node.proc.wait()
        node.proc = None

    def client(self, **kwargs):
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, **kwargs)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A 3-master Redis Cluster on loopback ports, shared by the session."""
    need_redis()
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def own_redis_cluster(tmp_path):
    """A 3-master cluster of this test alone (to stop and restart a node)."""
    need_redis()
    cluster = RedisClusterServers(tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()
