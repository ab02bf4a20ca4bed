"""The one place that talks to MLflow.

Every run, single or inside a multirun, gets the same record: the flattened config as
params, the git commit and a data fingerprint as tags, the loss per epoch, the final
metrics, a per-query plot and the final model as a pyfunc that scores new embeddings.
A run that raises ends FAILED (``mlflow.start_run`` does that on exit), never RUNNING.

Runs are named after what was changed on the command line, so the runs of a multirun
can be told apart; a fresh local store shows the project's experiment, not an empty
``Default``; and ``load_model`` says which store it searched when a run is not found.
A trial of an Optuna search (the config has ``optuna.study``/``optuna.trial``, set by the
sweeper) is tagged with its study and trial and nested under the study's parent run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import lightning as L
import mlflow
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure registry to close
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from streamml.provenance import git_commit

MAX_RUN_NAME = 250  # MLflow's limit on a run name


class _DropNotices(logging.Filter):
    """Drops MLflow's notices that say nothing about this run: each one is printed on every
    run, and a user cannot act on it (the model *is* a Python object by design). Only these
    messages go; any other MLflow warning still shows."""

    NOTICES = (
        "Creating initial MLflow database tables",  # a new mlflow.db
        "Updating database tables",
        "Passing a Python object as `python_model`",  # log_model of our QueryScorer
        "Validating input example against model signature",
        "Experiment with name",  # "... does not exist. Creating a new experiment."
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


for _name in ("mlflow.store.db.utils", "mlflow.pyfunc", "mlflow.tracking.fluent"):  # filters see only their own logger's records
    logging.getLogger(_name).addFilter(_DropNotices())


def _flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(node)}


def _short(value: str) -> str:
    return "…/" + value.rstrip("/").rsplit("/", 1)[-1] if "/" in value else value


def _short_value(value: str) -> str:
    """A float at 3 significant digits (an Optuna trial's ``0.012345678901234`` reads ``0.0123``);
    a path cut to its last part; anything else as is. The params keep the full value."""
    if any(c in value for c in ".eE") and "/" not in value:
        try:
            return f"{float(value):.3g}"
        except ValueError:
            pass
    return _short(value)


def run_name_with_overrides(base: str) -> str:
    """``base[key=value,...]`` with the command-line overrides that ``base`` does not already say.

    Names must tell the runs of a sweep apart at a glance in ``mlflow ui``, so they are short:
    an override of a config group (``learner=mlp``) is left out when ``base`` names it, a key
    keeps its last two parts (``optimizer.lr``), floats get 3 significant digits, paths their
    last part (``data.dir=…/queries``), and a trial shows its number, not its study (a tag).
    Outside Hydra, ``base`` as is.
    """
    if not HydraConfig.initialized():
        return base
    shown = []
    for override in HydraConfig.get().overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("experiment", "name", "logger.run_name", "optuna.study") or ("." not in key and value.lower() in base.lower()):
            continue
        shown.append(f"{'.'.join(key.split('.')[-2:])}={_short_value(value)}")
    name = f"{base}[{','.join(shown)}]" if shown else base
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 2] + "…]"


def use_experiment(name: str) -> None:
    """``mlflow.set_experiment(name)``; in a new local SQLite store, the empty ``Default`` becomes it.

    MLflow creates experiment 0, ``Default``, with every new store; renaming it (only when
    it is empty and the store is a local file) leaves the project's experiment the only one.
    """
    client = mlflow.MlflowClient()
    if urlparse(mlflow.get_tracking_uri()).scheme == "sqlite" and client.get_experiment_by_name(name) is None:
        default = client.get_experiment("0")
        if default.name == "Default" and default.lifecycle_stage == "active" and not client.search_runs(["0"], max_results=1):
            try:
                client.rename_experiment("0", name)
            except MlflowException:  # another process created `name` first
                pass
    mlflow.set_experiment(name)


@contextmanager
def start_run(cfg: DictConfig, tags: dict[str, str] | None = None, run_name: str | None = None,
              params: tuple[str, ...] | None = None):
    """Open a run in the experiment ``cfg.name`` and log the config; yields the run.

    ``params`` names the top-level config keys logged as params (default: all), so that a
    run logs only the settings it uses; ``config.yaml`` always holds the whole config.

    ``run_name`` gets the command-line overrides appended (``run_name_with_overrides``),
    unless the user named the run (``logger.run_name``), which is kept as given.
    """
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    use_experiment(cfg.name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tags = {"git_commit": git_commit(), **(tags or {}), **trial_tags(cfg)}
    if run_name and not cfg.logger.get("run_name"):
        run_name = run_name_with_overrides(run_name)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(tags)
        logged = resolved if params is None else {k: v for k, v in resolved.items() if k in params}
        mlflow.log_params(_flatten(logged))
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield run


STUDY_TAG, TRIAL_TAG, ROLE_TAG = "optuna_study", "optuna_trial", "streamml.role"


def _experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def study_run(tracking_uri: str, experiment: str, study: str, create: bool = False, wait_s: float = 0.0) -> str | None:
    """The id of Optuna study ``study``'s parent run in ``experiment``, found by its tags.

    Polls up to ``wait_s`` seconds (a process joining a study waits for the one that created
    it), then creates the run if ``create``, else returns None. Any process or machine that
    shares the tracking URI finds the same run, the oldest one if several were made.
    """
    if "'" in study:
        raise ValueError(f"Optuna study name {study!r} must not contain a single quote")
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    query = f"tags.{STUDY_TAG} = '{study}' and tags.`{ROLE_TAG}` = 'study'"
    deadline = time.monotonic() + wait_s
    while True:
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1)
        if runs:
            return runs[0].info.run_id
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not create:
        return None
    tags = {STUDY_TAG: study, ROLE_TAG: "study", "git_commit": git_commit()}
    return client.create_run(experiment_id, run_name=f"study-{study}", tags=tags).info.run_id


def finish_study_run(tracking_uri: str, run_id: str, study) -> None:
    """Record the study's best trial so far on its parent run and mark the run finished."""
    client = mlflow.MlflowClient(tracking_uri)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    client.log_metric(run_id, "best_value", float(study.best_value), step=len(done))
    client.set_tag(run_id, "best_trial", str(study.best_trial.number))
    client.set_tag(run_id, "best_params", str(study.best_params))
    client.set_terminated(run_id)


def trial_tags(cfg: DictConfig) -> dict[str, str]:
    """Tags of a search trial: its study, its number and its parent run (found by tag)."""
    search = cfg.get("optuna")
    if not search or search.get("study") is None:
        return {}
    tags = {STUDY_TAG: str(search.study), TRIAL_TAG: str(search.trial)}
    parent = study_run(cfg.logger.tracking_uri, cfg.name, str(search.study))
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


class EpochLoss(L.Callback):
    """Logs the module's epoch-level metrics to the active MLflow run, step = epoch."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        # DDP processes spawned for the fit have no active run: they log to this one, rank 0 only.
        run = mlflow.active_run()
        self.run_id, self.tracking_uri = (run.info.run_id, mlflow.get_tracking_uri()) if run else (None, None)

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        metrics = {f"{self.prefix}{k}": float(v) for k, v in trainer.callback_metrics.items()}
        if mlflow.active_run() is None and self.run_id:
            mlflow.MlflowClient(self.tracking_uri).log_batch(
                self.run_id, [mlflow.entities.Metric(k, v, int(time.time() * 1000), trainer.current_epoch) for k, v in metrics.items()])
        else:
            mlflow.log_metrics(metrics, step=trainer.current_epoch, synchronous=False)


def plot_per_query(per_query: pd.DataFrame, metric: str = "auc"):
    """Bar chart of each query's mean metric with its spread (std) over CV splits."""
    fig = Figure(figsize=(max(4, 0.6 * len(per_query) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(per_query["query_id"], per_query[metric], yerr=per_query[f"{metric}_std"], capsize=3, color="tab:blue")
    ax.axhline(per_query[metric].mean(), color="k", lw=1, ls="--", label=f"mean {per_query[metric].mean():.3f}")
    ax.set_ylim(min(0.5, float(per_query[metric].min()) - 0.05), 1.0)
    ax.set_ylabel(f"{metric} (mean ± std over splits)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_table(table: pd.DataFrame, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent))


def log_results(metrics: dict[str, float], per_query: pd.DataFrame, splits: pd.DataFrame) -> None:
    log_metrics(metrics)
    log_table(per_query, "results/per_query.csv")
    log_table(splits, "results/per_split.csv")
    fig = plot_per_query(per_query)
    mlflow.log_figure(fig, "plots/per_query_auc.png")


def plot_curves(curves: pd.DataFrame, title: str = ""):
    """One panel per metric, one line per learner: the learning curves with baselines overlaid."""
    metrics = list(dict.fromkeys(curves["metric"]))
    fig = Figure(figsize=(4.5 * len(metrics), 3.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for learner, part in curves[curves.metric == metric].groupby("learner", sort=False):
            ax.plot(part["step"], part["value"], marker="o", ms=3, label=learner, lw=2.5 if learner == "residual" else 1.2)
        ax.set_xlabel("events")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_curves(curves: pd.DataFrame, title: str = "") -> None:
    """Log each curve point as ``curve.<metric>.<learner>`` at its step, and the plot."""
    for step, part in curves.groupby("step"):
        mlflow.log_metrics({f"curve.{m}.{lr}": float(v) for m, lr, v in zip(part.metric, part.learner, part.value)}, step=int(step))
    fig = plot_curves(curves, title)
    mlflow.log_figure(fig, "plots/learning_curves.png")


class QueryScorer(mlflow.pyfunc.PythonModel):
    """A fitted learner packaged as an MLflow pyfunc.

    ``predict`` takes a DataFrame with a ``query_id`` column and an ``embedding`` column
    (one list of floats per row) and returns one score per row.
    """

    def __init__(self, learner, query_ids: list[str], embedding_dim: int):
        self.learner, self.query_ids, self.embedding_dim = learner, list(query_ids), embedding_dim

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        for column in ("query_id", "embedding"):
            if column not in model_input:
                raise ValueError(f"model input needs a '{column}' column; got {list(model_input.columns)}")
        unknown = sorted(set(model_input["query_id"]) - set(self.query_ids))
        if unknown:
            raise ValueError(f"unknown query_id {unknown[0]!r}; this model scores {self.query_ids}")
        X = np.asarray(model_input["embedding"].to_list(), dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must have {self.embedding_dim} floats each; got shape {X.shape}")
        groups = np.array([self.query_ids.index(q) for q in model_input["query_id"]])
        return self.learner.score_rows(X, groups)


def log_model(learner, query_ids: list[str], embedding_dim: int, input_example: pd.DataFrame | None = None) -> str:
    """Log ``learner`` as the pyfunc ``model`` of the active run; returns its URI.

    The signature (``query_id``: string, ``embedding``: array of floats) is inferred from
    ``input_example`` (default: one zero embedding of the first query). MLflow 3 stores the
    model as a LoggedModel; a copy under the run's artifacts puts ``model/`` in the run's
    artifact list too, where ``runs:/<run_id>/model`` and ``mlflow models serve`` find it.
    """
    if input_example is None:
        input_example = pd.DataFrame({"query_id": [query_ids[0]], "embedding": [[0.0] * embedding_dim]})
    scorer = QueryScorer(learner, query_ids, embedding_dim)
    signature = mlflow.models.infer_signature(input_example, scorer.predict(None, input_example))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=scorer,
        signature=signature,
        input_example=input_example,
        pip_requirements=["streamml", "torch", "scikit-learn", "river", "pandas", "numpy"],
    )
    with tempfile.TemporaryDirectory() as tmp, _environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=tmp)  # no bar for 7 small files
        mlflow.log_artifacts(local, "model")
    return info.model_uri


@contextmanager
def _environ(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def load_model(model_uri: str, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` that says which store it searched when it cannot find the run.

    ``tracking_uri`` defaults to MLflow's (``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the
    current directory). A local SQLite store that does not exist is an error here, rather
    than a new empty ``mlflow.db`` created where you happen to be.

    Examples
    --------
    >>> load_model("runs:/0123/model", tracking_uri="sqlite:////nonexistent/mlflow.db")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: no MLflow store at /nonexistent/mlflow.db (tracking URI sqlite:////nonexistent/mlflow.db); run from ...
    """
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    hint = "run from the folder that holds mlflow.db, or set MLFLOW_TRACKING_URI=sqlite:////absolute/path/to/mlflow.db"
    if tracking_uri.startswith("sqlite:///"):
        path = _sqlite_path(tracking_uri)
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {path} (tracking URI {tracking_uri}); {hint}")
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/"):].split("/", 1)[0]
        try:
            mlflow.MlflowClient(tracking_uri).get_run(run_id)
        except MlflowException as err:
            raise LookupError(f"run {run_id} not found in the MLflow store {tracking_uri}; {hint}") from err
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def _sqlite_path(uri: str) -> Path:
    """The file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    return Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0])).resolve()
