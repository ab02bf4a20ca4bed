"""notebooks/: every notebook runs top to bottom on a fresh clone, and none is committed with outputs.

Each runs in its own kernel with ``notebooks/`` as the working directory (as Jupyter starts),
this checkout first on ``PYTHONPATH``, and a temporary MLflow store.
"""

import os
import subprocess
import sys

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"eda.ipynb", "online_demo.ipynb", "compare_runs.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs; clear them before committing"


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def execute(path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eda.ipynb", "online_demo.ipynb"])
def test_notebook_runs(notebook_env, name):
    nb = execute(REPO / "notebooks" / name)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.outputs), f"{name} drew no plot"


@pytest.mark.slow
def test_compare_runs_reads_a_tiny_experiment(notebook_env, monkeypatch):
    monkeypatch.setenv("STREAMML_EXPERIMENT", "tiny_compare")
    cmd = [sys.executable, "-m", "streamml.train", "-m", "learner=sklearn_lr,river_stack", "name=tiny_compare",
           f"data.dir={REPO / 'data' / 'queries'}", "cv.n_folds=2", "cv.n_repeats=1", "final_fit=false",
           f"hydra.sweep.dir={notebook_env / 'sweep'}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    nb = execute(REPO / "notebooks" / "compare_runs.ipynb")
    table = nb.cells[2].outputs[0]["data"]["text/plain"]
    assert "sklearn_lr" in table and "river_stack" in table


@pytest.mark.slow
def test_compare_runs_on_an_empty_store_says_what_to_run_first(notebook_env):
    """eda needs only the shipped data and online_demo makes its own runs; compare_runs needs a store."""
    nb = execute(REPO / "notebooks" / "compare_runs.ipynb")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "no runs yet in experiment 'sweep_learners'" in printed
    assert "python -m streamml.train -m +experiment=sweep_learners" in printed
