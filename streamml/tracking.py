"""The one place that talks to MLflow.

Every run, single or inside a multirun, gets the same record: the flattened config as
params, the git commit and a data fingerprint as tags, the loss per epoch, the final
metrics, a per-query plot and the final model as a pyfunc that scores new embeddings.
A run that raises ends FAILED (``mlflow.start_run`` does that on exit), never RUNNING.
"""

from __future__ import annotations

import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


def _flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(node)}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def start_run(cfg: DictConfig, tags: dict[str, str] | None = None, run_name: str | None = None,
              params: tuple[str, ...] | None = None):
    """Open a run in the experiment ``cfg.name`` and log the config; yields the run.

    ``params`` names the top-level config keys logged as params (default: all), so that a
    run logs only the settings it uses; ``config.yaml`` always holds the whole config.
    """
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    mlflow.set_experiment(cfg.name)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"git_commit": git_commit(), **(tags or {})})
        logged = resolved if params is None else {k: v for k, v in resolved.items() if k in params}
        mlflow.log_params(_flatten(logged))
        mlflow.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        yield run


class EpochLoss(L.Callback):
    """Logs the module's epoch-level metrics to the active MLflow run, step = epoch."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = {f"{self.prefix}{k}": float(v) for k, v in trainer.callback_metrics.items()}
        mlflow.log_metrics(metrics, step=trainer.current_epoch, synchronous=False)


def plot_per_query(per_query: pd.DataFrame, metric: str = "auc"):
    """Bar chart of each query's mean metric with its spread (std) over CV splits."""
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(per_query) + 2), 3.5))
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
    plt.close(fig)


def plot_curves(curves: pd.DataFrame, title: str = ""):
    """One panel per metric, one line per learner: the learning curves with baselines overlaid."""
    metrics = list(dict.fromkeys(curves["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
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
    plt.close(fig)


class QueryScorer(mlflow.pyfunc.PythonModel):
    """A fitted learner packaged as an MLflow pyfunc.

    ``predict`` takes a DataFrame with a ``query_id`` column and an ``embedding`` column
    (one list of floats per row) and returns one score per row.
    """

    def __init__(self, learner, query_ids: list[str], embedding_dim: int):
        self.learner, self.query_ids, self.embedding_dim = learner, list(query_ids), embedding_dim

    def predict(self, context, model_input, params=None):
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
        return self.learner.score(X, groups)


def log_model(learner, query_ids: list[str], embedding_dim: int) -> str:
    """Log ``learner`` as a pyfunc under ``model``; returns its URI."""
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=QueryScorer(learner, query_ids, embedding_dim),
        pip_requirements=["streamml", "torch", "scikit-learn", "river", "pandas", "numpy"],
    )
    return info.model_uri
