"""Helpers shared by tests and benchmarks: a free loopback port, a wait on a condition, and
(re-exported from ``streamml.provenance``) the machine description and the git commit.

One definition each: copies drift (one checked the cluster bus port, another did not; one
wait had a deadline, another could hang for ever).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from streamml.provenance import git_commit, machine

__all__ = ["free_port", "git_commit", "machine", "wait_until", "wait_until_answering"]

T = TypeVar("T")


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


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 30.0, every_s: float = 0.05,
               retry_on: type[BaseException] | tuple[type[BaseException], ...] = ()) -> T:
    """Call ``condition()`` until it returns a true value, and return that value.

    The one way a test waits for something (a server up, a key expired, a thread's work done):
    on the condition itself, with a deadline, never a sleep that guesses how long it takes.
    A ``retry_on`` exception from the condition counts as "not yet"; any other ends the wait at
    once (a condition that finds its server process dead raises, with the server's log). After
    ``timeout_s`` an ``AssertionError`` names ``what`` was awaited. The sleep below only paces
    the polling.

    >>> wait_until(lambda: 3, "a true value")
    3
    """
    if timeout_s <= 0 or every_s <= 0:
        raise ValueError(f"timeout_s and every_s must be positive, got {timeout_s} and {every_s}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except retry_on:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(every_s)


def wait_until_answering(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180.0) -> None:
    """Ask ``url`` until it answers 200, while the server ``proc`` runs.

    A server that exits ends the wait at once (``RuntimeError``); one that never answers fails
    after ``timeout_s`` (``AssertionError``). Either error ends with the server's ``log``.
    """
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200

    try:
        wait_until(answers, f"{url} to answer", timeout_s, every_s=0.5, retry_on=OSError)
    except AssertionError as e:
        raise AssertionError(f"{e}: {log.read_text()[-3000:]}") from None
