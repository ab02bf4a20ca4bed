"""Simulated worlds for the online benchmark: a catalog, a frozen head and the users who search it.

A :class:`World` is what every learner meets, identically: the catalog embeddings and their
query, the head's scores of them, and the users. Each :class:`User` has an **interaction
pool** (the only items a policy may show) and a **probe set** that is never shown: the
learner's scores on the probe set, against the user's truth, measure what it has learned
about the user rather than what it has memorised. Pool and probe are fixed per user, so
every learner is measured on the same items.

Two worlds with a head, and one without:

* :func:`real_users` (``personalize``): each query's real items are split in two stratified
  halves. A head trained on the population labels of one half scores the other half, whose
  items are a user's candidates, so the head has seen neither the pool's nor the probe's
  population labels.
* :func:`large_catalog`: 200 to 2,000 candidates per user, sampled from a diagonal Gaussian
  mixture fitted to each query's real embeddings (renormalised to unit length). Population
  labels come from a logistic regression fitted on the query's real labels (plus noise);
  the head is trained on a separate population sample, never on a user's candidates.
* :func:`coldstart_streams`: no head; one prequential pass over each query's items.

Users deviate from the population in one of three ways (``USER_MODELS``): a k-means cluster
of their candidates with the population labels flipped (``flip_cluster``), a preference
shifted along a random direction (``shift``), or not at all (``none``: there adaptation must
do no harm). On the real items a user's answers may also be noisy (``label_noise``), and a
population of other users answers part of the catalog (``n_population``): the events a
learner's ``fit_population`` learns from, as on a real platform.

**Tuning and test streams** (``streams="tune"`` or ``"test"``) draw every random choice from
disjoint seed sequences: the half splits, the users' clusters and directions, pool and probe,
the sampled catalogs and the policy's randomness. Hyperparameters are chosen on ``tune`` and
reported on ``test``. On the real data both streams reuse the same 443 texts (there are no
others); the large catalog samples new items for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from streamml.data import QueryData

__all__ = ["STREAMS", "USER_MODELS", "User", "World", "real_users", "large_catalog", "coldstart_streams", "stream_seed"]

STREAMS = {"tune": 0, "test": 1}
USER_MODELS = ("flip_cluster", "shift", "none")


def stream_seed(streams: str, seed: int) -> list[int]:
    """The root of every random choice of a world: ``[seed, stream id]``."""
    if streams not in STREAMS:
        raise ValueError(f"streams must be one of {sorted(STREAMS)}, got {streams!r}")
    return [int(seed), STREAMS[streams]]


@dataclass
class User:
    """One simulated user of one query.

    Attributes
    ----------
    name
        Unique within the world (the learner's user key).
    query
        The query code (the catalog's ``item_query`` value).
    model
        How the truth deviates from the population: one of ``USER_MODELS``.
    pool, pool_truth
        Item ids a policy may show, and the user's answer (1 accept, 0 reject) to each.
    probe, probe_truth
        Item ids never shown, and the user's answer to each; both classes are present.
    """

    name: str
    query: int
    model: str
    pool: np.ndarray
    pool_truth: np.ndarray
    probe: np.ndarray
    probe_truth: np.ndarray


@dataclass
class World:
    """A catalog, the head's scores of it (None without a head), and its users."""

    items: np.ndarray  # (N, D) float32
    item_query: np.ndarray  # (N,) int query code
    head_scores: np.ndarray | None  # (N,) raw head scores
    users: list[User] = field(default_factory=list)
    query_ids: list[str] = field(default_factory=list)
    population: "pd.DataFrame | None" = None  # other users' events on the catalog, for learners' fit_population


def split_probe(truth: np.ndarray, probe_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (pool, probe) of a stratified split; the probe gets at least one of each class.

    >>> pool, probe = split_probe(np.array([0, 0, 0, 1, 1, 1, 1, 1]), 0.25, np.random.default_rng(0))
    >>> len(pool), len(probe), sorted(np.array([0, 0, 0, 1, 1, 1, 1, 1])[probe].tolist())
    (6, 2, [0, 1])
    """
    if not 0 < probe_fraction < 1:
        raise ValueError(f"probe_fraction must be in (0, 1), got {probe_fraction}")
    probe = []
    for label in (0, 1):
        where = np.flatnonzero(truth == label)
        if len(where) < 2:
            raise ValueError(f"a user needs at least 2 candidates of each class to split off a probe set, "
                             f"got {len(where)} with truth {label}")
        n = min(len(where) - 1, max(1, round(probe_fraction * len(where))))
        probe.append(rng.choice(where, n, replace=False))
    probe = np.sort(np.concatenate(probe))
    return np.setdiff1d(np.arange(len(truth)), probe), probe


def flip_cluster(X: np.ndarray, population: np.ndarray, rng: np.random.Generator, n_clusters: int,
                 min_per_class: int = 3) -> np.ndarray:
    """The population labels with one k-means cluster of ``X`` flipped.

    The cluster is drawn among those whose flip leaves ``min_per_class`` items of each class.
    """
    cluster = KMeans(n_clusters, n_init=3, random_state=int(rng.integers(2**31))).fit_predict(X)
    flips = [np.where(cluster == c, 1 - population, population) for c in range(n_clusters)]
    usable = [f for f in flips if min(f.sum(), len(f) - f.sum()) >= min_per_class]
    if not usable:
        raise ValueError(f"no cluster of {len(X)} candidates can be flipped leaving {min_per_class} of each class")
    return usable[rng.integers(len(usable))]


def _make_user(name, query, model, items, truth, probe_fraction, rng) -> User:
    pool, probe = split_probe(truth, probe_fraction, rng)
    return User(name, int(query), model, items[pool], truth[pool], items[probe], truth[probe])


def _check_user_models(users: dict, allowed=USER_MODELS) -> dict[str, int]:
    users = {str(k): int(v) for k, v in dict(users).items()}
    unknown = sorted(set(users) - set(allowed))
    if unknown:
        raise ValueError(f"unknown user model {unknown[0]!r}; choose from {list(allowed)}")
    return users


def _truth(model: str, X: np.ndarray, population: np.ndarray, rng: np.random.Generator, n_clusters: int,
           shift: float, label_noise: float) -> np.ndarray:
    """A user's answers to candidates ``X`` whose population labels are ``population``.

    ``none`` agrees with the population, ``flip_cluster`` flips one k-means cluster, ``shift``
    thresholds ``(2 y - 1) + shift * (a standardised random direction)`` at the population's
    accept rate. Then each answer is flipped with probability ``label_noise``: real users are
    not consistent, and a learner must not chase their noise.
    """
    if model == "none":
        truth = population.copy()
    elif model == "flip_cluster":
        truth = flip_cluster(X, population, rng, n_clusters)
    else:
        t = X @ rng.standard_normal(X.shape[1])
        u = (2.0 * population - 1) + shift * (t - t.mean()) / (t.std() or 1.0)
        truth = (u > np.quantile(u, 1 - population.mean())).astype(np.int64)
    if label_noise == 0:  # no draw: the worlds of noiseless users stay as they were
        return truth
    out = np.where(rng.random(len(truth)) < label_noise, 1 - truth, truth)
    return out if 0 < out.sum() < len(out) else truth  # a user keeps both classes


def real_users(data: QueryData, head, streams: str = "test", seed: int = 0, users: dict | None = None,
               n_clusters: int = 3, probe_fraction: float = 0.4, label_noise: float = 0.0, shift: float = 1.0,
               n_population: int = 0, population_answers: float = 0.3) -> World:
    """Users over the real items, scored by a head fit on the other half of their query.

    ``head`` is an offline learner (``fit(X, y, groups)`` / ``score_rows(X, groups)``); ``users``
    maps a user model (``none``, ``flip_cluster`` or ``shift``, see :func:`_truth`) to the number
    of users per query half. ``n_population`` more users per query half, of the same mix and
    drawn from other seeds, each answer a random ``population_answers`` of the half's items:
    their events are the world's ``population``, for learners that fit one.
    """
    from sklearn.model_selection import StratifiedKFold

    users = _check_user_models(users or {"flip_cluster": 4, "none": 1})
    if not 0 <= label_noise < 0.5:
        raise ValueError(f"label_noise is a flip probability in [0, 0.5), got {label_noise}")
    root = stream_seed(streams, seed)
    y, query = data.y, data.query
    half = np.full(len(y), -1)
    for q in range(len(data.query_ids)):
        rows = np.flatnonzero(query == q)
        split_seed = int(np.random.default_rng([*root, q]).integers(2**31))
        for h, (_, part) in enumerate(StratifiedKFold(2, shuffle=True, random_state=split_seed).split(rows, y[rows])):
            half[rows[part]] = h
    head.fit(data.X, y, query * 2 + half)
    head_scores = np.asarray(head.score_rows(data.X, query * 2 + (1 - half)), np.float64)

    world = World(data.X, query, head_scores, query_ids=list(data.query_ids))
    kinds = [model for model, count in users.items() for _ in range(count)]
    events = []
    for q in range(len(data.query_ids)):
        for h in (0, 1):
            cand = np.flatnonzero((query == q) & (half == h))
            for index, model in enumerate(kinds):
                rng = np.random.default_rng([*root, q, h, index])
                truth = _truth(model, data.X[cand], y[cand], rng, n_clusters, shift, label_noise)
                world.users.append(_make_user(f"q{q}h{h}u{index}", q, model, cand, truth, probe_fraction, rng))
            for index in range(n_population):
                rng = np.random.default_rng([*root, q, h, 100_000 + index])
                truth = _truth(kinds[index % len(kinds)], data.X[cand], y[cand], rng, n_clusters, shift, label_noise)
                seen = rng.random(len(cand)) < population_answers
                events.append(pd.DataFrame({"user": f"pop-q{q}h{h}u{index}", "query": q, "item": cand[seen],
                                            "label": truth[seen], "time": float(len(events))}))
    if events:
        world.population = pd.concat(events, ignore_index=True)
    return world


def _sample_mixture(gmm: GaussianMixture, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit-length draws from a fitted diagonal mixture, with our own generator."""
    component = rng.choice(len(gmm.weights_), size=n, p=gmm.weights_)
    X = gmm.means_[component] + np.sqrt(gmm.covariances_[component]) * rng.standard_normal((n, gmm.means_.shape[1]))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


class _Population:
    """One query's generator: a mixture over its embeddings and a population score of them."""

    def __init__(self, X, y, n_components: int, label_noise: float, seed: int):
        from sklearn.linear_model import LogisticRegression

        self.gmm = GaussianMixture(n_components, covariance_type="diag", reg_covar=1e-4, random_state=seed).fit(X)
        self.lr = LogisticRegression(C=10.0, max_iter=1000).fit(X, y)
        self.label_noise = label_noise
        self.accept_rate = float(np.mean(y))
        reference = _sample_mixture(self.gmm, 4000, np.random.default_rng([seed, 1]))
        logit = self.lr.decision_function(reference)
        self.mean, self.std = float(logit.mean()), float(logit.std()) or 1.0
        noisy = self.score(reference) + label_noise * np.random.default_rng([seed, 2]).standard_normal(len(reference))
        self.threshold = float(np.quantile(noisy, 1 - self.accept_rate))

    def score(self, X) -> np.ndarray:
        """The population's standardised preference score."""
        return (self.lr.decision_function(X) - self.mean) / self.std

    def labels(self, X, rng) -> np.ndarray:
        noisy = self.score(X) + self.label_noise * rng.standard_normal(len(X))
        return (noisy > self.threshold).astype(np.int64)


def _catalog_user(pop: _Population, model: str, lo: int, hi: int, shift: float, label_noise: float, n_clusters: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One large-catalog user's candidates (their count drawn log-uniformly in ``[lo, hi]``) and answers."""
    n = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    X = _sample_mixture(pop.gmm, n, rng)
    if model == "shift":
        t = X @ rng.standard_normal(X.shape[1])
        u = pop.score(X) + shift * (t - t.mean()) / (t.std() or 1.0) + label_noise * rng.standard_normal(n)
        return X, (u > np.quantile(u, 1 - pop.accept_rate)).astype(np.int64)
    truth = pop.labels(X, rng)
    return X, flip_cluster(X, truth, rng, n_clusters) if model == "flip_cluster" else truth


def large_catalog(data: QueryData, head, streams: str = "test", seed: int = 0, users: dict | None = None,
                  n_candidates: tuple[int, int] = (200, 2000), n_population: int = 500, n_components: int = 4,
                  label_noise: float = 0.5, shift: float = 1.0, n_clusters: int = 3,
                  probe_fraction: float = 0.2, population_users: int = 0, population_answers: int = 40) -> World:
    """Users with 200-2,000 generated candidates each, over a head trained on a population sample.

    ``users`` maps a user model to the number of users per query. ``n_candidates`` bounds
    each user's candidate count (drawn log-uniformly). A ``shift`` user's truth thresholds
    ``population score + shift * (standardised projection on a random direction) + noise``
    at the population's acceptance rate. ``population_users`` more users per query, of the
    same mix and drawn from other seeds, each answer ``population_answers`` random items of
    candidates of their own (appended to the catalog after every user's): their events are the
    world's ``population``, for learners that fit one. No two of them answer the same item.
    """
    users = _check_user_models(users or {"flip_cluster": 2, "shift": 2, "none": 1})
    root = stream_seed(streams, seed)
    lo, hi = n_candidates
    if not 2 <= lo <= hi:
        raise ValueError(f"n_candidates must be (low, high) with 2 <= low <= high, got {tuple(n_candidates)}")
    y, query = data.y, data.query
    items, item_query, head_X, head_y, head_q, people, answered = [], [], [], [], [], [], []
    for q in range(len(data.query_ids)):
        rows = np.flatnonzero(query == q)
        pop = _Population(data.X[rows], y[rows], n_components, label_noise, seed=seed + q)  # the world's law: one per query
        rng = np.random.default_rng([*root, q])
        Xp = _sample_mixture(pop.gmm, n_population, rng)
        head_X.append(Xp), head_y.append(pop.labels(Xp, rng)), head_q.append(np.full(n_population, q))
        index = 0
        for model, count in users.items():
            for _ in range(count):
                rng = np.random.default_rng([*root, q, 1000 + index])
                X, truth = _catalog_user(pop, model, lo, hi, shift, label_noise, n_clusters, rng)
                people.append((f"q{q}u{index}", q, model, len(X), truth, rng))
                items.append(X), item_query.append(np.full(len(X), q))
                index += 1
        kinds = [model for model, count in users.items() for _ in range(count)]
        for index in range(population_users):
            rng = np.random.default_rng([*root, q, 100_000 + index])
            X, truth = _catalog_user(pop, kinds[index % len(kinds)], lo, hi, shift, label_noise, n_clusters, rng)
            seen = np.sort(rng.choice(len(X), min(population_answers, len(X)), replace=False))
            answered.append((f"pop-q{q}u{index}", q, X[seen], truth[seen]))
    for _, q, X, _ in answered:  # after every user's candidates: the users' item ids do not move
        items.append(X), item_query.append(np.full(len(X), q))
    X = np.concatenate(items)
    item_query = np.concatenate(item_query)
    head.fit(np.concatenate(head_X), np.concatenate(head_y), np.concatenate(head_q))
    world = World(X, item_query, np.asarray(head.score_rows(X, item_query), np.float64), query_ids=list(data.query_ids))
    start = 0
    for name, q, model, n, truth, rng in people:
        world.users.append(_make_user(name, q, model, np.arange(start, start + n), truth, probe_fraction, rng))
        start += n
    events = []
    for name, q, answers, truth in answered:
        events.append(pd.DataFrame({"user": name, "query": q, "item": np.arange(start, start + len(answers)),
                                    "label": truth, "time": float(len(events))}))
        start += len(answers)
    if events:
        world.population = pd.concat(events, ignore_index=True)
    return world


def coldstart_streams(data: QueryData, streams: str = "test", seed: int = 0, n_orders: int = 5) -> list[tuple[str, int, np.ndarray]]:
    """``(user, query, item order)`` per query and order: one user per random pass over a query."""
    root = stream_seed(streams, seed)
    out = []
    for q in range(len(data.query_ids)):
        rows = np.flatnonzero(data.query == q)
        for order in range(n_orders):
            out.append((f"q{q}order{order}", q, np.random.default_rng([*root, q, order]).permutation(rows)))
    return out
