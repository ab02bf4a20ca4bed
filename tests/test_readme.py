"""The README's commands work as written.

Every command in a ``bash`` block is either run here or marked below with the reason it is
not (``MARKS``: it needs a cluster, the problem owner's data, your own files or ids, or it
is the installation this suite already runs in); a new command that is neither fails
``test_every_readme_command_is_run_or_marked``. The commands of a newcomer's path run in
order in a fresh copy of the repository, servers included: started on a free port, asked
until they answer, and stopped. The long experiments run too with ``STREAMML_README_ALL=1``
(about an hour on 2 cores). The Python snippet of docs/online.md runs in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, SHARED_QUERIES
from tests.helpers import free_port, wait_until_answering

# (pattern, reason) in order: the first match decides.
MARKS = [
    (r"^python -m pip install", "install: the set-up this suite runs in (.ci/run runs exactly it)"),
    (r"10\.0\.0\.5|@db:5432|mlflow-host|^mlflow server|/shared/", "cluster: other machines (Redis, PostgreSQL, an MLflow server)"),
    (r"\.\./shared/data/queries|nested_offline\.sh", "shared data: the problem owner's data, not shipped"),
    (r"EXPERIMENT|<run_id>|<id>|1323b8\.\.\.|my_texts|my_events|population=population",
     "placeholder: your experiment, run id, event id or files"),
    (r"\+experiment=online_replay", "shared data: real users' logged feedback (MovieLens 100k in ../shared), not shipped"),
    (r"^python -m streamml\.loop (retrain|rollback)",
     "traffic: needs a log of users' answers and a promotion first (tests/loop/test_end_to_end.py runs the loop)"),
]
LONG = [  # run only with STREAMML_README_ALL=1: minutes each on 2 cores
    r"^python -m streamml\.train (-m )?\+experiment=",
    r"^python -m streamml\.train learner=mlp",
    r"^python -m streamml\.train -m (learner=linear|hparams_search=offline_heads hydra)",
    r"^python experiments/bench_online\.py",
]
SERVERS = {"python -m streamml.serve": "/healthz", "mlflow ui": "/"}


def readme() -> str:
    return (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Every command of every ``bash`` block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line.strip())[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def mark(command: str) -> str | None:
    return next((reason for pattern, reason in MARKS if re.search(pattern, command)), None)


def is_long(command: str) -> bool:
    return any(re.search(pattern, command) for pattern in LONG)


def python_block(containing: str, path: Path = REPO / "docs" / "online.md") -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_every_readme_command_is_run_or_marked():
    commands = readme_commands()
    assert "python -m streamml.register" in commands
    assert commands.index("python -m streamml.register") < next(i for i, c in enumerate(commands) if "@champion" in c)
    run = [c for c in commands if mark(c) is None]
    for command in run:  # what runs is a command this module knows how to run
        assert command.startswith(("python -m streamml.", "python experiments/", "curl ", "mlflow ui")), command
    assert "python -m streamml.train" in run and any(c.startswith("curl ") for c in run)


def test_the_two_setup_commands_open_the_readme():
    commands = readme_commands()
    assert [mark(c) for c in commands[:2]] == [MARKS[0][1]] * 2
    assert commands[1].endswith("python -m pytest")
    assert readme().index("## Quick start") < readme().index("```bash")


def fresh_copy(tmp_path: Path) -> Path:
    """The tracked files as they are in this working tree: a fresh clone, with this change."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    return clone


@pytest.mark.slow
def test_readme_commands_run_in_order_on_a_fresh_copy(tmp_path):
    clone = fresh_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "STREAMML_TOKEN")}
    env["PYTHONPATH"] = str(clone)
    everything = os.environ.get("STREAMML_README_ALL") == "1"
    server, port, ran = None, None, []
    try:
        for command in readme_commands():
            if mark(command) and not (everything and "shared data" in mark(command) and SHARED_QUERIES.is_dir()):
                continue
            if is_long(command) and not everything:
                continue
            if command.startswith("curl "):
                assert server is not None, f"{command} needs a server started above it"
                command = command.replace("localhost:8000", f"localhost:{port}")
            server_path = next((path for start, path in SERVERS.items() if command.startswith(start)), None)
            if server_path:
                if server is not None:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(timeout=60)
                port = free_port()
                started = re.sub(r"\bport=\d+", "", command) + (f" --port {port}" if command.startswith("mlflow") else f" port={port}")
                log = tmp_path / f"server-{len(ran)}.log"
                server = subprocess.Popen(started, shell=True, cwd=clone, env=env, start_new_session=True,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT)
                wait_until_answering(server, f"http://127.0.0.1:{port}{server_path}", log)
            else:
                out = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
                assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
                if "/v1/rank" in command:
                    assert len(json.loads(out.stdout)["items"]) == 5
            ran.append(command)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    after_serve = readme_commands()[readme_commands().index("python -m streamml.serve") + 1]
    assert ran[:3] == ["python -m streamml.train", "python -m streamml.serve", after_serve]
    assert "python -m streamml.register" in ran and any("@champion" in c for c in ran)


def test_online_snippet_runs_with_the_experiments_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(python_block("ResidualLearner("), namespace)
    learner, candidates = namespace["learner"], namespace["candidates"]
    experiment = yaml.safe_load((REPO / "configs" / "experiment" / "online_personalize.yaml").read_text())
    rule = yaml.safe_load((REPO / "configs" / "rule" / f"{experiment['defaults'][2]['/rule']}.yaml").read_text())
    assert type(learner.rule).__name__ == rule["_target_"].rsplit(".", 1)[-1]
    assert {k: getattr(learner.rule, k) for k in experiment["rule"]} == experiment["rule"]
    assert {k: getattr(learner, k) for k in experiment["online"]} == experiment["online"]
    assert sorted(namespace["best"].tolist()) == sorted(candidates.tolist())
    assert len(learner.store) == 2  # users 7 and 8 remain; 42 was forgotten
    assert np.isfinite(learner.score(7, 3, namespace["data"].X[candidates])).all()
