"""Scaling a search out: two sweep processes share one Optuna study on a real PostgreSQL
server, as two machines of a cluster would, and MLflow runs on the same server.

The fixture starts a throwaway server (Debian's ``postgresql`` package; root cannot run it,
so it runs as the ``postgres`` user) in a temp dir on a free port, and removes it afterwards.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import optuna
import pytest
from test_sweeper import search_records, tiny_search_args

from conftest import write_queries
from tests.helpers import free_port

psycopg2 = pytest.importorskip("psycopg2", reason="PostgreSQL storage needs psycopg2: pip install -e '.[search]'")


def _bin_dir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def postgres():
    """A running PostgreSQL server; yields ``make_db(name) -> SQLAlchemy URL``."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    # Not under pytest's tmp_path: as root, that path is closed to the postgres user.
    root = Path(tempfile.mkdtemp(prefix="streamml-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root needs a 'postgres' user to start PostgreSQL (apt-get install -y postgresql makes it)")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*args):
        subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True, timeout=120)

    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")

    def make_db(name: str) -> str:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

    try:
        yield make_db
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_on_postgres(postgres, tmp_path):
    storage, tracking = postgres("optuna"), postgres("mlflow")
    mlflow.MlflowClient(tracking).search_experiments()  # create MLflow's tables once, before two processes race to
    query_dir = write_queries(tmp_path / "queries")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_TRACKING_URI": tracking}
    n_trials = {"a": 2, "b": 3}
    procs = {
        name: subprocess.Popen([sys.executable, *tiny_search_args(query_dir, storage, tmp_path / f"multirun_{name}", n, study="shared")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, n in n_trials.items()
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sweep {name} failed:\n{output[-6000:]}"

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    total = sum(n_trials.values())
    assert sorted(t.number for t in trials) == list(range(total))  # none lost, none duplicated
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    parents, runs = search_records(tracking, "offline_search", "shared")
    assert len(parents) == 1  # both processes found the one parent run
    assert len(runs) == total
    assert len({r.info.run_id for r in runs}) == total
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == list(range(total))
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    for run in runs:
        assert run.data.metrics["tuning_auc"] == pytest.approx(trials[int(run.data.tags["optuna_trial"])].value)
