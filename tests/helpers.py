"""Helpers shared by tests and benchmarks: a free loopback port, and (re-exported from
``streamml.provenance``) the machine description and the git commit.

One definition each: copies drift (one checked the cluster bus port, another did not).
tests/serve/test_workers.py and tests/stores/redis_fixtures.py still hold their own
``free_port``; they belong to the service and store suites, to be switched to this one.
"""

from __future__ import annotations

import socket

from streamml.provenance import git_commit, machine

__all__ = ["free_port", "git_commit", "machine"]


def free_port(bus_offset: int | None = None) -> int:
    """A loopback port free right now (and, for a Redis Cluster node, ``port + bus_offset`` too).

    The port is released before it is returned, so another process may take it first; the
    caller starts its server on it at once, and a test that loses the race fails loudly.
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if bus_offset is None:
            return port
        if port + bus_offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + bus_offset))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")
