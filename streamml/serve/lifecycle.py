"""Model lifecycle: what a worker serves, staged reloads, rollback, and agreement across workers.

A :class:`Served` bundles everything one head needs to answer requests: the head, the
catalog scored by it, and the online learner whose per-user residuals live in the
backend under the head's fingerprint. Requests read ``lifecycle.current`` once and use
that bundle throughout, so swapping in a new one never mixes two heads in one answer.

A reload is staged: the new head is loaded and checked (it must score every catalog
query, with finite scores, at the catalog's embedding length) away from the request
path, and only then swapped in; a head that fails the checks leaves the old one
serving. The swap is published in the backend's control record (``uri``, ``previous``
and a ``version`` counter); the other workers poll that record and load the same head.
Rollback publishes the previous URI again.

Served as a registry alias (``model=models:/streamml@champion``), a worker loads the version
the alias points at and remembers it (``Served.registry_version``); with
``reload.follow_alias_s > 0`` it asks the registry that often whether the alias has moved
(:meth:`Lifecycle.alias_moved`) and reloads the alias if so (``python -m streamml.loop
promote`` moves it). Each worker follows the alias itself; the control record keeps naming
the alias, so an explicit reload to another URI stops the following until one reloads the alias.

A learner fitted to a population (``population=PATH``, the mixed learner) is built and given
its population fit when the head is prepared (:mod:`streamml.serve.population`), and its
per-user state lives under the population's key (the head's fingerprint and the fit's digest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from streamml.serve.model import Head, alias_version, load_head, parse_alias, resolve_model_uri

if TYPE_CHECKING:
    from streamml.online.learner import ResidualLearner

__all__ = ["Prepared", "Served", "Lifecycle", "bootstrap", "check_population"]


@dataclass
class QueryItems:
    ids: np.ndarray  # (n,) catalog item ids
    rows: np.ndarray  # (n,) rows of the learner's catalog
    texts: list[str]


@dataclass
class Prepared:
    """A loaded and checked head with the catalog scored by it (no store touched yet)."""

    head: Head
    X: np.ndarray  # (N, D) every catalog item
    item_query: np.ndarray  # (N,) str
    head_scores: np.ndarray  # (N,)
    queries: dict[str, QueryItems]
    row_of: dict[int, int]
    learner: object | None = None  # a learner fitted to a population, without its store yet
    namespace: str | None = None  # where that learner's per-user state lives
    raw_scores: Callable[[str, np.ndarray], np.ndarray] | None = None
    registry_version: str | None = None  # the version a registry alias pointed at when loaded


@dataclass
class Served:
    head: Head
    learner: ResidualLearner
    queries: dict[str, QueryItems]
    row_of: dict[int, int]
    # a learner of catalog items only (the mixed learner): raw candidates' scores from their head scores
    raw_scores: Callable[[str, np.ndarray], np.ndarray] | None = None
    registry_version: str | None = None  # served as a registry alias: the version it pointed at

    @property
    def version(self) -> str:
        return self.head.version


def prepare(head: Head, catalog) -> Prepared:
    """Score the catalog with ``head`` and check it can serve every query."""
    blocks, queries, row_of, start = [], {}, {}, 0
    for query in catalog.queries():
        ids, texts, X = catalog.items(query)
        if not head.has(query):
            raise ValueError(f"model {head.uri} has no head for catalog query {query!r}; it scores {head.query_ids}")
        X = np.asarray(X, np.float32)
        if X.shape[1] != head.dim:
            raise ValueError(f"catalog query {query!r} has {X.shape[1]}-d embeddings, model {head.uri} takes {head.dim}")
        h = head.score(query, X)
        if not np.isfinite(h).all():
            raise ValueError(f"model {head.uri} gives non-finite scores on catalog query {query!r}")
        rows = np.arange(start, start + len(X))
        ids = np.asarray(ids, np.int64)
        queries[query] = QueryItems(ids, rows, list(texts))
        row_of.update(zip(ids.tolist(), rows.tolist()))
        blocks.append((query, X, h))
        start += len(X)
    if not blocks:
        raise ValueError("the item catalog is empty: load it with `python -m streamml.serve command=load_items`")
    X = np.concatenate([b[1] for b in blocks])
    item_query = np.concatenate([np.full(len(b[1]), b[0], dtype=object) for b in blocks]).astype(str)
    head_scores = np.concatenate([b[2] for b in blocks])
    return Prepared(head, X, item_query, head_scores, queries, row_of)


def bootstrap(cfg, backend, publish: bool = False) -> str:
    """Fill an empty catalog from ``cfg.items_dir`` and make sure a model is published.

    ``publish=True`` (what ``python -m streamml.serve`` does at start) publishes the
    configured model (``cfg.model``, else the newest finished run) even over an earlier
    one; otherwise an existing control record wins. Returns the URI to serve.
    """
    if not backend.catalog.queries():
        if not cfg.items_dir:
            raise ValueError("the item catalog is empty and items_dir is not set")
        backend.catalog.load_folder(cfg.items_dir)
    record = backend.control.get()
    if record and not publish:
        return record["uri"]
    uri = resolve_model_uri(cfg.model, cfg.tracking_uri, cfg.experiment)
    if not record or record["uri"] != uri:
        previous = record["uri"] if record else None
        backend.control.set({"version": (record["version"] + 1) if record else 1, "uri": uri, "previous": previous})
    return uri


def check_population(make_learner, population: str | None) -> None:
    """A learner with ``fit_population`` (the mixed learner) needs a population log; no other takes one."""
    learner_type = getattr(make_learner, "func", make_learner)
    name = getattr(learner_type, "__name__", repr(learner_type))
    if hasattr(learner_type, "fit_population") and not population:
        raise ValueError(f"the online learner {name} learns its prior and factors from a population: pass "
                         "population=PATH, a log of user, query, item, label, time (CSV or Parquet)")
    if population and not hasattr(learner_type, "fit_population"):
        raise ValueError(f"population={population} is given, but the online learner {name} has no fit_population "
                         "(serve online=mixed)")


class Lifecycle:
    """Holds the served bundle of one worker and swaps it.

    Parameters
    ----------
    backend
        The worker's backend (state, catalog, control).
    make_learner
        ``make_learner(items, item_query, head_scores, store) -> learner``: the
        configured online learner (a Hydra partial of ``ResidualLearner``).
    tracking_uri
        Where MLflow URIs resolve.
    population
        A log of the population's feedback (:mod:`streamml.serve.population`), needed by and
        only by learners with ``fit_population`` (the mixed learner).
    """

    def __init__(self, backend, make_learner, tracking_uri: str, experiment: str = "default",
                 population: str | None = None):
        check_population(make_learner, population)
        self.population = population
        self.backend, self.make_learner = backend, make_learner
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.current: Served | None = None
        self.seen_version: int | None = None
        self.last_sync = 0.0

    # ---- staged: the slow part, safe off the request path (no store is touched)
    def prepare(self, uri: str | None) -> Prepared:
        uri = resolve_model_uri(uri, self.tracking_uri, self.experiment)
        version = alias_version(uri, self.tracking_uri)
        if version is None:
            head = load_head(uri, self.tracking_uri)
        else:  # the version itself (cached, immutable), named by the alias it was reached through
            head = replace(load_head(f"models:/{parse_alias(uri)[0]}/{version}", self.tracking_uri), uri=uri)
        p = prepare(head, self.backend.catalog)
        p.registry_version = version
        if self.population:
            from streamml.serve.population import RawScorer, attach_population

            p.learner = self.make_learner(items=p.X, item_query=p.item_query, head_scores=p.head_scores, store=None)
            p.namespace = attach_population(p.learner, self.population, p, self.backend.blobs)
            p.raw_scores = RawScorer.of(p.learner.population, p.item_query, p.head_scores)
        return p

    # ---- swap: quick, on the request thread
    def activate(self, p: Prepared) -> Served:
        if p.learner is not None:  # fitted in prepare; its state lives under its population's key
            learner = p.learner
            learner.store = self.backend.state(learner.schema, p.namespace)
        else:
            namespace = p.head.fingerprint[:16]
            learner = self.make_learner(
                items=p.X, item_query=p.item_query, head_scores=p.head_scores,
                store=lambda schema: self.backend.state(schema, namespace),
            )
        self.current = Served(p.head, learner, p.queries, p.row_of, p.raw_scores, p.registry_version)
        return self.current

    def alias_moved(self) -> str | None:
        """The served alias URI if the registry alias now points at another version than the one served, else None.

        One registry call; None too when the served model is not an alias.
        """
        current = self.current
        if current is None or current.registry_version is None:
            return None
        return current.head.uri if alias_version(current.head.uri, self.tracking_uri) != current.registry_version else None

    def publish(self, uri: str) -> dict:
        record = self.backend.control.get() or {"version": 0, "uri": None}
        previous = record["uri"] if record["uri"] != uri else record.get("previous")
        new = {"version": record["version"] + 1, "uri": uri, "previous": previous}
        self.backend.control.set(new)
        self.seen_version = new["version"]
        return new

    def pending(self) -> dict | None:
        """The control record if it names another model than the one served, else None."""
        self.last_sync = time.monotonic()
        record = self.backend.control.get()
        if record is None or record["version"] == self.seen_version:
            return None
        if self.current is not None and record["uri"] == self.current.head.uri:
            self.seen_version = record["version"]
            return None
        return record
