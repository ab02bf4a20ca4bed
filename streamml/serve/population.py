"""The mixed learner in the service: its population fit, made once per head and stored with it.

``python -m streamml.serve online=mixed population=PATH`` serves
:class:`~streamml.online.MixedLearner` with ``configs/online/mixed.yaml``, the config the
replay (``+experiment=online_replay``) uses. ``PATH`` is a log of the population's feedback in
the replay's documented format (:func:`streamml.online.replay.read_log`: CSV or Parquet with
``user, query, item, label, time`` and optionally ``text``). Each row's item is found in the
service's catalog by its catalog id, or, when ``item`` is not a catalog id of the row's query
and the log has a ``text`` column, by the (query, text) of a catalog item. A row that names no
catalog item, a query the catalog lacks, or a malformed log is a :class:`LogError` naming the
file and the row (rows counted from 0, after the header).

**Stored with the head.** When a worker prepares a head (at start, reload or rollback) it
builds the learner on the catalog scored by that head, and looks for the population in the
backend's ``blobs`` under :func:`population_key`: the head's fingerprint followed by a digest of
the events, the catalog and the learner's settings that shape the fit (``k``, ``factors``,
``trust``, ``seed``). Found, it is loaded; otherwise the worker calls ``fit_population`` and
stores the fit with ``put_once``, so workers racing at start agree on the first fit stored,
a restart loads it without refitting, and another head (or another log, catalog or setting)
never reuses it. The per-user state lives under the same key: a key's state is a posterior
under the prior it was learned with, so it is never read back under another population.

**What it scores.** Catalog items, exactly as ``MixedLearner.score`` does (the replay's
scores). Raw candidates (embeddings or texts not in the catalog) get the global model only:
the head, standardised with its query's catalog mean and spread, through the population's
slope and intercept (:meth:`RawScorer.__call__`); no item effect, no factors, no per-user part,
so every user sees them in the head's order. Rewards and feedback on raw candidates are refused
(501): the mixed learner learns catalog items only. The learner has no posterior to sample,
so Thompson shows its greedy slate (:func:`streamml.online.policies.policy_scores`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from streamml.online.population import Population
from streamml.online.replay import LogError, read_log

__all__ = ["population_events", "population_key", "dumps", "loads", "RawScorer", "attach_population"]

FIT_SETTINGS = ("k", "factors", "trust", "seed", "covariance")  # the settings that change fit_population's result
# (a diagonal learner keeps its population turned to the prior's eigenbasis, so the two never share one)


def population_events(path: str | Path, queries: dict, row_of: dict[int, int]) -> pd.DataFrame:
    """The log at ``path`` as ``fit_population`` takes it: ``user, query, item, label, time`` with
    ``item`` the learner's catalog row. ``queries``: the service's query -> items (ids, rows,
    texts); ``row_of``: catalog id -> row."""
    frame = read_log(path)
    has_text = "text" in frame.columns
    by_text = {(q, t): int(r) for q, items in queries.items() for t, r in zip(items.texts, items.rows.tolist())}
    rows = np.empty(len(frame), np.int64)
    for n, (query, item) in enumerate(zip(frame["query"].astype(str), frame["item"])):
        items = queries.get(query)
        if items is None:
            raise LogError(f"{path}, row {n}: query {query!r} is not in the service's catalog; it has {sorted(queries)}")
        try:
            row = row_of.get(int(item)) if float(item) == int(item) else None
        except (TypeError, ValueError):
            row = None
        if row is None or not items.rows[0] <= row <= items.rows[-1]:
            row = by_text.get((query, str(frame["text"].iat[n]))) if has_text else None
        if row is None:
            how = "nor is its text" if has_text else "and the log has no text column to find it by"
            raise LogError(f"{path}, row {n}: item {item!r} is not a catalog id of query {query!r}, {how} in the catalog")
        rows[n] = row
    return pd.DataFrame({"user": frame["user"].astype(str), "query": frame["query"].astype(str), "item": rows,
                         "label": frame["label"].astype(np.int8), "time": frame["time"]})


def population_key(head_fingerprint: str, events: pd.DataFrame, learner) -> str:
    """Where the population fit of ``events`` for ``learner`` (on the catalog scored by the head)
    is stored: the head's fingerprint, then a digest of the events, catalog and fit settings."""
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(events[["user", "query", "item", "label", "time"]], index=False).to_numpy().tobytes())
    h.update(np.ascontiguousarray(learner.X).tobytes())
    h.update("\0".join(map(str, learner.item_query.tolist())).encode())
    h.update(np.ascontiguousarray(learner.z, np.float64).tobytes())
    h.update(json.dumps({s: str(getattr(learner, s, None)) for s in FIT_SETTINGS}, sort_keys=True).encode())
    return head_fingerprint[:16] + h.hexdigest()[:16]


def dumps(pop: Population) -> bytes:
    """A population fit as ``.npz`` bytes (no pickles)."""
    meta = {"slope": pop.slope, "intercept": pop.intercept, "n_events": pop.n_events, "fingerprint": pop.fingerprint,
            "history": pop.history}
    buf = io.BytesIO()
    np.savez(buf, item_effect=pop.item_effect, factors=pop.factors, prior_cov=pop.prior_cov,
             meta=np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8))
    return buf.getvalue()


def loads(data: bytes) -> Population:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        return Population(float(meta["slope"]), float(meta["intercept"]), z["item_effect"], z["factors"], z["prior_cov"],
                          int(meta["n_events"]), str(meta["fingerprint"]), meta["history"])


@dataclass
class RawScorer:
    """The global model's log-odds of raw candidates (not in the catalog) from their head scores:
    ``slope * (head - mean_q) / std_q + intercept``, with ``mean_q``, ``std_q`` the head's over the
    query's catalog items, as ``MixedLearner`` standardises it (module doc)."""

    slope: float
    intercept: float
    stats: dict[str, tuple[float, float]]  # query -> (mean, std) of the head over its catalog items

    @classmethod
    def of(cls, pop: Population, item_query: np.ndarray, head_scores: np.ndarray) -> RawScorer:
        stats = {}
        for q in np.unique(item_query).tolist():
            h = np.asarray(head_scores, np.float64)[item_query == q]
            mean, std = float(h.mean()), float(h.std())
            stats[q] = (mean, std if std > 1e-12 * max(abs(mean), 1) else 1.0)  # as standardized_head
        return cls(float(pop.slope), float(pop.intercept), stats)

    def __call__(self, query: str, head: np.ndarray) -> np.ndarray:
        mean, std = self.stats[query]
        return (self.slope * (np.asarray(head, np.float64) - mean) / std + self.intercept).astype(np.float32)


def attach_population(learner, path: str | Path, prepared, blobs) -> str:
    """Give ``learner`` (built on ``prepared``'s catalog, no store yet) the population of the log at
    ``path``: the one stored in ``blobs`` for this head, or a new fit stored there. Returns its key."""
    events = population_events(path, prepared.queries, prepared.row_of)
    key = population_key(prepared.head.fingerprint, events, learner)
    name = f"population:{key}"
    stored = blobs.get(name)
    if stored is None:
        fitted = learner.fit_population(events).population
        stored = blobs.put_once(name, dumps(fitted))  # another worker may have stored its fit first: use that one
    learner.set_population(loads(stored))
    return key
