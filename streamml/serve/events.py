"""Rank, reward and feedback: the event logic of the service, independent of HTTP.

A rank answer gets a fresh event id, and the event log keeps what was shown (item ids,
or the vectors of raw candidates), to whom, under which policy, bucket and head. A
reward names that event id, and within the reward window the first reward of each shown
item is applied: the backend's ``claim(event_id, item)`` succeeds once across all
workers, so a duplicate is acknowledged and not applied again. After the window a reward
is refused (410): the user's state has moved on, and the logged propensities no longer
describe what would be shown. Plain feedback (a caller that ranked elsewhere) is
idempotent on the caller's own event id the same way, per user on every backend.

Every check runs before anything is written, so bad input changes nothing. A reward then
takes one path: :func:`learner_update` asks the online learner for its store update without
running it (an :class:`~streamml.serve.backend.Update`), and ``backend.claim_and_apply(claim,
update)`` hands it with its :class:`~streamml.stores.events.Claim` to the store's
``update_claimed``: on SQLite and on Redis both commit in one transaction (on Redis the
claim's key carries the user's hash tag, so it shares the slot of the user's state), so a
failed update or a killed process leaves both or neither. A reward's claim keeps its label and
time: the log then holds what was shown and what the user did with it (the export reads it).
Errors are :class:`ServeError` with the HTTP status to answer.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import time
from collections.abc import Callable

import numpy as np

from streamml.online.policies import Thompson, policy_scores
from streamml.serve import metrics, schemas
from streamml.serve.backend import Update
from streamml.serve.lifecycle import Served
from streamml.stores.events import Claim

__all__ = ["ServeError", "Limits", "bucket_of", "rank", "reward", "feedback", "user_state", "forget"]


class ServeError(Exception):
    """A request that cannot be served: ``status`` is the HTTP status, ``detail`` says why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Limits:
    """Request limits and the event timing (``configs/serve/default.yaml: limits, events``)."""

    def __init__(self, max_candidates: int = 1000, max_k: int = 100, max_body_bytes: int = 4_000_000,
                 window_s: float = 600.0, retention_s: float = 3600.0, client_event_ttl_s: float = 86400.0):
        self.max_candidates, self.max_k, self.max_body_bytes = int(max_candidates), int(max_k), int(max_body_bytes)
        self.window_s, self.retention_s = float(window_s), float(retention_s)
        self.client_event_ttl_s = float(client_event_ttl_s)
        if self.retention_s < self.window_s:
            raise ValueError(f"events.retention_s ({retention_s}) must be >= events.window_s ({window_s})")


def bucket_of(user: str, buckets: list[tuple[str, float]], salt: str = "") -> str:
    """A/B bucket of ``user``: a stable hash, so a user stays in one bucket across
    workers and restarts. ``buckets``: (name, share) with shares summing to 1.

    >>> bucket_of("alice", [("a", 0.5), ("b", 0.5)]) == bucket_of("alice", [("a", 0.5), ("b", 0.5)])
    True
    """
    u = int.from_bytes(hashlib.sha256(f"{salt}\0{user}".encode()).digest()[:8], "big") / 2.0**64
    total = 0.0
    for name, share in buckets:
        total += share
        if u < total:
            return name
    return buckets[-1][0]


def _query(served: Served, query: str):
    items = served.queries.get(query)
    if items is None:
        raise ServeError(404, f"unknown query {query!r}; known: {sorted(served.queries)}")
    return items


def _vectors(served: Served, rows: list[list[float]], what: str) -> np.ndarray:
    dim = served.head.dim
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise ServeError(422, f"{what}[{i}] has {len(row)} floats, expected {dim}")
    X = np.asarray(rows, np.float32).reshape(len(rows), dim)
    if not np.isfinite(X).all():  # finite as float64 but not as float32 (|x| > 3.4e38)
        i = int(np.flatnonzero(~np.isfinite(X).all(1))[0])
        raise ServeError(422, f"{what}[{i}] overflows float32")
    return X


def _encode(X: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(X, np.float32).tobytes()).decode()


def _decode(s: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), np.float32).reshape(-1, dim)


def rank(served: Served, req: schemas.RankRequest, limits: Limits, events, policy, policy_name: str,
         bucket: str, rng: np.random.Generator) -> schemas.RankResponse:
    user = str(req.user)
    items = _query(served, req.query)
    if req.k > limits.max_k:
        raise ServeError(422, f"k={req.k} is over the limit of {limits.max_k}")
    given = req.items if req.items is not None else req.embeddings if req.embeddings is not None else req.texts
    if given is not None:
        if len(given) == 0:
            raise ServeError(422, "the candidate list is empty")
        if len(given) > limits.max_candidates:
            raise ServeError(422, f"{len(given)} candidates is over the limit of {limits.max_candidates}")
    learner = served.learner
    record = {"user": user, "query": req.query, "created": time.time(), "model": served.version,
              "bucket": bucket, "policy": policy_name}
    if req.embeddings is not None or req.texts is not None:
        if req.texts is not None:
            X = _embed(req.texts)
        else:
            X = _vectors(served, req.embeddings, "embeddings")
        head = served.head.score(req.query, X)
        if served.raw_scores is not None:  # a learner of catalog items only: the global model (serve/population.py)
            scores = served.raw_scores(req.query, head)
            ranked = scores[None, :] if isinstance(policy, Thompson) else scores
        else:
            ranked = _vector_policy_scores(policy, learner, user, req.query, X, head, rng)
            scores = ranked if ranked.ndim == 1 else learner.score(user, req.query, X, head=head)
        cand_ids, texts = np.arange(len(X)), req.texts
    else:
        if req.items is None:
            cand_ids, rows = items.ids, items.rows
        else:
            cand_ids = np.asarray(req.items, np.int64)
            rows = np.empty(len(cand_ids), np.int64)
            seen = set()
            for i, item in enumerate(req.items):
                row = served.row_of.get(item)
                if row is None or row < items.rows[0] or row > items.rows[-1]:
                    raise ServeError(404, f"unknown item {item} for query {req.query!r} (items[{i}])")
                if item in seen:
                    raise ServeError(422, f"item {item} is given twice (items[{i}])")
                seen.add(item)
                rows[i] = row
        # what the policy ranks: the scores, or Thompson's posterior draws (as in the simulator)
        ranked = policy_scores(policy, learner, user, req.query, rows, rng)
        scores = ranked if ranked.ndim == 1 else learner.score(user, req.query, rows)
        X = head = None
        texts = None
    rejected = events.rejected(user, req.query) if X is None else set()
    shown, propensities = _select_without(policy, ranked, scores, req.k, rng, np.isin(cand_ids, list(rejected)))
    record["shown"] = cand_ids[shown].tolist()
    record["propensities"] = propensities.tolist()
    if X is not None:
        record["vectors"], record["head"] = _encode(X[shown]), head[shown].tolist()
    event_id = events.new_event_id(user)
    events.create(event_id, record, limits.retention_s)
    metrics.EVENTS.labels(bucket).inc()
    out = []
    for pos, (c, p) in enumerate(zip(shown.tolist(), propensities.tolist())):
        item = int(cand_ids[c])
        if texts is not None:
            text = texts[c]
        elif X is None:
            text = items.texts[served.row_of[item] - items.rows[0]]
        else:
            text = None
        out.append(schemas.Shown(item=item, position=pos, score=float(scores[c]), propensity=float(p), text=text))
    return schemas.RankResponse(event_id=event_id, user=user, query=req.query, items=out, policy=policy_name,
                                bucket=bucket, model_version=served.version)


def _select_without(policy, ranked: np.ndarray, scores: np.ndarray, k: int, rng,
                    rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The policy's slate over the candidates the user did not just reject: ``(shown, propensities)``.

    Items rejected within the reward window never fill a slot, exploration or greedy: a
    user reads a rejected item coming back as "my reject was ignored". The policy runs on
    the other candidates, so its propensities are exact for them (they are the policy's,
    given that set). Only if fewer than ``k`` remain do rejected items fill the last slots,
    best score first: deterministic given the set, so their propensity is 1.
    """
    if not rejected.any():
        slate = policy.select(ranked, k, rng)
        return slate.items, slate.propensities
    keep, drop = np.flatnonzero(~rejected), np.flatnonzero(rejected)
    shown, props = np.zeros(0, np.int64), np.zeros(0)
    if len(keep):
        slate = policy.select(ranked[..., keep], k, rng)  # (n,) scores or (S, n) draws
        shown, props = keep[slate.items], slate.propensities
    fill = drop[np.argsort(-scores[drop], kind="stable")][: max(0, min(k, len(scores)) - len(shown))]
    return np.concatenate([shown, fill]).astype(np.int64), np.concatenate([props, np.ones(len(fill))])


def _vector_policy_scores(policy, learner, user: str, query: str, X: np.ndarray, head: np.ndarray, rng) -> np.ndarray:
    """:func:`~streamml.online.policies.policy_scores` for raw candidate embeddings, which also
    need their head scores (``policy_scores`` takes catalog ids, whose head scores the learner has)."""
    if not isinstance(policy, Thompson):
        return learner.score(user, query, X, head=head)
    if getattr(learner, "has_posterior", False):
        return learner.sample_scores(user, query, X, policy.n_samples, rng, head=head)
    return np.asarray(learner.score(user, query, X, head=head))[None, :]  # no posterior: one draw, the greedy slate


def _embed(texts: list[str]) -> np.ndarray:
    try:
        from streamml.embed import embed_texts

        return embed_texts(texts)
    except ImportError as err:
        raise ServeError(422, f"raw texts need the text extra (pip install streamml[text]): {err}") from err


def _label(label: str) -> int:
    return 1 if label == "accepted" else 0


class _Recorder:
    """A stand-in for the learner's store that records the one update the learner asks for
    (``update_many(keys, fn)``) instead of running it; reads go to the real store."""

    def __init__(self, store):
        self.store, self.schema, self.update = store, store.schema, None

    def update_many(self, keys, fn) -> None:
        if self.update is not None:
            raise RuntimeError("the online learner asked for two updates where one claim guards one")
        self.update = Update(self.store, list(keys), fn)

    def get_many(self, keys):
        return self.store.get_many(keys)


def learner_update(served: Served, learn: Callable[[object], None]) -> Update:
    """The store update that ``learn(learner)`` (``learn_one``, ``learn_vector``) would make, not run:
    a shallow copy of the learner (sharing its catalog arrays) writes to a :class:`_Recorder`."""
    learner = copy.copy(served.learner)
    learner.store = recorder = _Recorder(served.learner.store)
    learn(learner)
    if recorder.update is None:
        raise RuntimeError(f"{type(learner).__name__} did not update through its store's update_many")
    return recorder.update


def _item_update(served: Served, user: str, query: str, item: int, label: int) -> Update:
    return learner_update(served, lambda learner: learner.learn_one(user, query, served.row_of[item], label))


def _no_raw_learning(served: Served) -> ServeError:
    name = type(served.learner).__name__
    if served.raw_scores is not None:
        return ServeError(501, f"the online learner {name} learns catalog items only: raw candidates are ranked by the "
                               "global model, and feedback on them is not learned (send catalog item ids)")
    return ServeError(501, f"this online learner ({name}) cannot learn from raw embeddings (no learn_vector)")


def _vector_update(served: Served, user: str, query: str, x: np.ndarray, head: float, label: int) -> Update:
    if not hasattr(served.learner, "learn_vector"):
        raise _no_raw_learning(served)
    return learner_update(served, lambda learner: learner.learn_vector(user, query, x, head, label))


def reward(served: Served, event_id: str, req: schemas.RewardRequest, limits: Limits, backend) -> schemas.RewardResponse:
    record = backend.events.get(event_id)
    if record is None:
        raise ServeError(404, f"unknown or expired event {event_id!r}")
    age = time.time() - record["created"]
    if age > limits.window_s:
        metrics.LATE.inc(len(req.rewards))
        raise ServeError(410, f"event {event_id!r} is {age:.0f} s old; rewards are accepted for {limits.window_s:g} s")
    shown = {item: j for j, item in enumerate(record["shown"])}
    for i, r in enumerate(req.rewards):
        if r.item not in shown:
            raise ServeError(422, f"item {r.item} was not shown in event {event_id!r} (rewards[{i}]); shown: {record['shown']}")
    if "vectors" in record and not hasattr(served.learner, "learn_vector"):
        raise _no_raw_learning(served)
    if "vectors" not in record and record["query"] not in served.queries:
        raise ServeError(409, f"query {record['query']!r} of event {event_id!r} is no longer in the catalog")
    user, query = record["user"], record["query"]
    vectors = _decode(record["vectors"], served.head.dim) if "vectors" in record else None
    results, applied = [], 0
    for r in req.rewards:
        if vectors is None:
            update = _item_update(served, user, query, r.item, _label(r.label))
        else:
            j = shown[r.item]
            update = _vector_update(served, user, query, vectors[j], record["head"][j], _label(r.label))
        if vectors is None and r.label == "rejected":  # kept out of this user's slates for the window
            backend.events.note_rejected(user, query, r.item, limits.window_s)
        try:
            won = backend.claim_and_apply(Claim("event", user, event_id, r.item, label=_label(r.label), time=time.time()),
                                          update)
        except KeyError:  # expired since the get above
            raise ServeError(404, f"unknown or expired event {event_id!r}") from None
        if not won:
            metrics.DUPLICATES.labels("reward").inc()
            results.append(schemas.Outcome(item=r.item, status="duplicate"))
            continue
        metrics.UPDATES.labels("reward").inc()
        applied += 1
        results.append(schemas.Outcome(item=r.item, status="applied"))
    return schemas.RewardResponse(event_id=event_id, results=results, applied=applied, duplicates=len(results) - applied)


def feedback(served: Served, req: schemas.FeedbackRequest, limits: Limits, backend) -> schemas.FeedbackResponse:
    user = str(req.user)
    items = _query(served, req.query)
    if req.item is not None:
        row = served.row_of.get(req.item)
        if row is None or row < items.rows[0] or row > items.rows[-1]:
            raise ServeError(404, f"unknown item {req.item} for query {req.query!r}")
        update = _item_update(served, user, req.query, req.item, _label(req.label))
        if req.label == "rejected":
            backend.events.note_rejected(user, req.query, req.item, limits.window_s)
    else:
        x = _vectors(served, [req.embedding], "embedding")[0]
        if not hasattr(served.learner, "learn_vector"):
            raise _no_raw_learning(served)
        head = float(served.head.score(req.query, x[None])[0])
        update = _vector_update(served, user, req.query, x, head, _label(req.label))
    if not backend.claim_and_apply(Claim("client", user, req.event_id, ttl_s=limits.client_event_ttl_s), update):
        metrics.DUPLICATES.labels("feedback").inc()
        return schemas.FeedbackResponse(event_id=req.event_id, status="duplicate")
    metrics.UPDATES.labels("feedback").inc()
    return schemas.FeedbackResponse(event_id=req.event_id, status="applied")


def _keys(served: Served, user: str) -> tuple[list, list[str]]:
    learner = served.learner
    if getattr(learner, "key", "user_query") == "user":
        return [user], ["*"]
    queries = sorted(served.queries)
    return [(user, q) for q in queries], queries


def user_state(served: Served, user: str, bucket: str) -> schemas.UserState:
    store = served.learner.store
    keys, names = _keys(served, user)
    field = "residual" if "residual" in store.schema else "mean"  # the mixed learner's state: its random effect's mean
    residual = store.get_many(keys)[field].astype(np.float32)
    norms = np.linalg.norm(residual, axis=1)
    stored = [schemas.QueryState(query=q, residual_norm=float(n)) for k, q, n in zip(keys, names, norms) if k in store]
    return schemas.UserState(user=user, model_version=served.version, bucket=bucket, queries=stored)


def forget(served: Served, user: str, events) -> None:
    """Forget the user's residuals and recent rejects: a forgotten user is a cold start."""
    served.learner.forget(user)
    events.forget_rejected(user)
