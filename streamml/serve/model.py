"""The frozen per-query head the service scores with, loaded from MLflow.

Where the head comes from: an MLflow model URI (``runs:/<id>/model``, a registered
alias such as ``models:/streamml@champion``), or by default the newest FINISHED run of
an experiment that logged a model (what ``python -m streamml.train`` just wrote).

The logged pyfunc takes a pandas DataFrame; building one per request costs more
than the scoring itself. So the head's weights are taken out of the pyfunc once
and scored in numpy (a linear head is one dot product per candidate). Learners
that are not neural heads (sklearn, river baselines) keep their own ``score_rows``.

The fingerprint is a hash of the head's weights: per-user residuals are learned
against one head and are stored under its fingerprint, so serving another head
starts from fresh residuals rather than reusing mismatched ones silently.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Head", "load_head", "resolve_model_uri", "parse_alias", "alias_version"]


@dataclass
class Head:
    """Raw head scores per query: ``score(query, X) -> (n,)``.

    Examples
    --------
    >>> head = Head.linear(["a", "b"], np.array([[1., 0.], [0., 1.]]), np.array([0., 5.]), uri="mem")
    >>> head.score("b", np.array([[1., 2.], [3., 4.]])).tolist()
    [7.0, 9.0]
    """

    query_ids: list[str]
    uri: str
    fingerprint: str
    dim: int
    _score: Callable[[int, np.ndarray], np.ndarray] = field(repr=False)

    def __post_init__(self):
        self._index = {q: i for i, q in enumerate(self.query_ids)}

    @property
    def version(self) -> str:
        return self.fingerprint[:12]

    def has(self, query: str) -> bool:
        return query in self._index

    def score(self, query: str, X: np.ndarray) -> np.ndarray:
        return self._score(self._index[query], np.asarray(X, np.float32))

    @classmethod
    def linear(cls, query_ids, weight: np.ndarray, bias: np.ndarray, uri: str) -> "Head":
        w, b = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        return cls(list(query_ids), uri, _digest(query_ids, w, b), w.shape[1], lambda g, X: X @ w[g] + b[g])

    @classmethod
    def mlp(cls, query_ids, w1, b1, w2, b2, uri: str) -> "Head":
        w1, b1, w2, b2 = (np.asarray(a, np.float32) for a in (w1, b1, w2, b2))

        def score(g, X):  # (n, D) @ (D, H) -> relu -> (n, H) @ (H,)
            return np.maximum(X @ w1[g] + b1[g], 0.0) @ w2[g] + b2[g]

        return cls(list(query_ids), uri, _digest(query_ids, w1, b1, w2, b2), w1.shape[1], score)


def _digest(query_ids, *arrays) -> str:
    h = hashlib.sha256("\0".join(query_ids).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def resolve_model_uri(model: str | None, tracking_uri: str, experiment: str = "default") -> str:
    """``model`` itself, or ``runs:/<id>/model`` of the newest FINISHED run of ``experiment``
    that logged a model."""
    import mlflow

    if model:
        return model
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(
            f"no MLflow experiment {experiment!r} at {tracking_uri}: run `python -m streamml.train` first, "
            "or pass model=<MLflow model URI>"
        )
    runs = mlflow.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
        max_results=1, output_format="list",
    )
    if not runs:
        raise LookupError(f"no FINISHED run in MLflow experiment {experiment!r} at {tracking_uri}")
    return f"runs:/{runs[0].info.run_id}/model"


def parse_alias(uri: str) -> tuple[str, str] | None:
    """``(name, alias)`` of a registry alias URI ``models:/<name>@<alias>``, else None.

    >>> parse_alias("models:/streamml@champion"), parse_alias("models:/streamml/3"), parse_alias("runs:/abc/model")
    (('streamml', 'champion'), None, None)
    """
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, _, alias = uri[len("models:/"):].rstrip("/").partition("@")
    return (name, alias) if name and alias and "/" not in alias else None


def alias_version(uri: str, tracking_uri: str | None = None) -> str | None:
    """The registered version that the alias URI ``uri`` points at now (None: ``uri`` is not an alias).

    One registry call (``MlflowClient.get_model_version_by_alias``); the service polls it
    to follow the alias (``reload.follow_alias_s``).
    """
    parsed = parse_alias(uri)
    if parsed is None:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    return str(client.get_model_version_by_alias(*parsed).version)


_CACHE: dict[tuple[str, str | None], Head] = {}


def _immutable(uri: str) -> bool:
    """A run's artifacts and a numbered model version never change; an alias can move."""
    return uri.startswith("runs:/") or (uri.startswith("models:/") and "@" not in uri and uri.rstrip("/").rsplit("/", 1)[-1].isdigit())


def load_head(uri: str, tracking_uri: str | None = None) -> Head:
    """Load the pyfunc logged by :func:`streamml.tracking.log_model` and take its head out
    (loaded once per process for URIs that cannot change)."""
    key = (uri, tracking_uri)
    if key not in _CACHE:
        head = _load_head(uri, tracking_uri)
        if not _immutable(uri):
            return head
        _CACHE[key] = head
    return _CACHE[key]


def _load_head(uri: str, tracking_uri: str | None) -> Head:
    import mlflow
    import torch

    from streamml.offline.heads import LinearHeads, MLPHeads
    from streamml.offline.module import HeadLearner

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    scorer = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    learner, query_ids = scorer.learner, [str(q) for q in scorer.query_ids]
    if isinstance(learner, HeadLearner):
        # the learner's group of query i is i (train fits on query indices); map to head rows
        rows = np.searchsorted(learner.groups_, np.arange(len(query_ids)))
        heads = learner.heads_
        with torch.no_grad():
            p = {name: t.detach().cpu().numpy()[rows] for name, t in heads.named_parameters()}
        if type(heads) is LinearHeads:
            return Head.linear(query_ids, p["weight"], p["bias"], uri)
        if type(heads) is MLPHeads:
            return Head.mlp(query_ids, p["w1"], p["b1"], p["w2"], p["b2"], uri)

    def score(g, X):  # any other fit/score_rows learner: its own scores, slower but exact
        return np.asarray(learner.score_rows(X, np.full(len(X), g)), np.float32)

    fp = hashlib.sha256(pickle.dumps(learner)).hexdigest()
    return Head(query_ids, uri, fp, int(scorer.embedding_dim), score)
