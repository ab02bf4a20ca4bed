"""``python -m streamml.register [RUN_ID] [--name streamml] [--alias champion]``.

Registers the model a training run logged (``runs:/RUN_ID/model``) as a new version of an
MLflow registered model and points an alias at it, so that a stable URI such as
``models:/streamml@champion`` names "the model to serve" (``python -m streamml.serve
model=models:/streamml@champion``) while the run behind it can change. Without ``RUN_ID``
it takes the newest FINISHED run of the experiment (``--experiment``, ``default``) that
logged a model, which is what ``python -m streamml.train`` just wrote.

It imports MLflow only (not Lightning or torch), so it answers in a few seconds. A failure
prints one line on stderr and exits 1; the traceback goes to ``outputs/register.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from urllib.parse import unquote

from streamml.cli import one_line_failure

LOG_FILE = Path("outputs") / "register.log"


def tracking_uri_default() -> str:
    """MLflow's own default for this project: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` here."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def _check_store(tracking_uri: str) -> None:
    # MLflow would create an empty store where none exists and then report a missing run;
    # the real cause is the folder (or the URI), so say that.
    if tracking_uri.startswith("sqlite:///"):
        path = Path(unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])).resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"no MLflow store at {path}: run `python -m streamml.train` first, from this folder, "
                "or set MLFLOW_TRACKING_URI")


def newest_model_run(client, experiment: str) -> str:
    """The id of the newest FINISHED run of ``experiment`` with a ``model/`` artifact."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r}: run `python -m streamml.train` first")
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=50):
        if any(a.path == "model" for a in client.list_artifacts(run.info.run_id)):
            return run.info.run_id
    raise LookupError(f"no FINISHED run with a model in MLflow experiment {experiment!r}: "
                      "run `python -m streamml.train` (searches skip the model: final_fit=false)")


def register(run_id: str | None = None, name: str = "streamml", alias: str = "champion",
             experiment: str = "default", tracking_uri: str | None = None) -> tuple[str, str]:
    """Register ``runs:/<run_id>/model`` as a new version of ``name`` and set ``alias`` on it.

    Returns ``(version, "models:/<name>@<alias>")``.
    """
    tracking_uri = tracking_uri or tracking_uri_default()
    _check_store(tracking_uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if run_id is None:
        run_id = newest_model_run(client, experiment)
    else:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise LookupError(f"run {run_id} not found in the MLflow store {tracking_uri}") from None
        if not any(a.path == "model" for a in client.list_artifacts(run_id)):
            raise LookupError(f"run {run_id} logged no model (searches skip it: final_fit=false)")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version), f"models:/{name}@{alias}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamml.register", description=__doc__.split("\n\n")[1])
    parser.add_argument("run_id", nargs="?", help="the training run (default: the newest FINISHED run with a model)")
    parser.add_argument("--name", default="streamml", help="registered model name (default: streamml)")
    parser.add_argument("--alias", default="champion", help="alias set on the new version (default: champion)")
    parser.add_argument("--experiment", default="default", help="where to look without RUN_ID (default: default)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    args = parser.parse_args(argv)
    try:
        version, uri = register(args.run_id, args.name, args.alias, args.experiment, args.tracking_uri)
    except Exception as err:  # one line for the user, the traceback for whoever debugs it
        print(one_line_failure(err, LOG_FILE), file=sys.stderr)
        return 1
    print(f"registered version {version} of {args.name!r} as {uri}")
    return 0


if __name__ == "__main__":
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    sys.exit(main())
