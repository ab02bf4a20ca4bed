"""tests/helpers.py and streamml.provenance: the one free port, machine and commit helpers."""

import socket
import subprocess

from conftest import REPO
from tests.helpers import free_port, git_commit, machine


def test_free_port_can_be_bound_and_a_cluster_bus_port_too():
    port = free_port(bus_offset=10000)
    for p in (port, port + 10000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # raises if the helper returned a taken port


def test_git_commit_is_head_here_and_unknown_outside_a_checkout(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert git_commit(cwd=REPO).removesuffix("-dirty") == head
    assert head.startswith(git_commit(short=True, cwd=REPO).removesuffix("-dirty"))
    assert git_commit(cwd=tmp_path) == "unknown"


def test_machine_names_cores_python_and_the_installed_versions_without_importing_them():
    import importlib.metadata as md
    import os

    text = machine(packages=("numpy", "no-such-package"))
    assert f"{os.cpu_count()} cores" in text and f"numpy {md.version('numpy')}" in text
    assert "no-such-package" not in text and "load average" in text


def test_wait_until_returns_the_value_retries_what_it_is_told_and_names_what_never_came():
    import itertools

    import pytest

    from tests.helpers import wait_until

    tries = itertools.count()
    assert wait_until(lambda: next(tries) >= 3 and "done", "the third try", every_s=0.001) == "done"

    def flaky():
        if next(tries) < 6:
            raise ConnectionError("not yet")
        return 42

    assert wait_until(flaky, "a server", every_s=0.001, retry_on=ConnectionError) == 42
    with pytest.raises(AssertionError, match="waited 0.05 s for nothing"):
        wait_until(lambda: False, "nothing", timeout_s=0.05, every_s=0.01)
    with pytest.raises(KeyError):  # not retried: ends the wait at once
        wait_until(lambda: {}["x"], "a key", retry_on=ConnectionError)
    with pytest.raises(ValueError, match="positive"):
        wait_until(lambda: True, "x", timeout_s=0)
