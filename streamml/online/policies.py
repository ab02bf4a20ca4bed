"""Slate policies: which k of the scored candidates to show, and in which order.

Every policy has ``select(scores, k, rng) -> Slate`` and ``marginals(scores, k)``.
A slate records, for each shown item, its propensity: the probability that the
policy puts that item at that position, given the scores (marginal over the
policy's randomness). These are exact (up to float rounding), so that off-policy
estimators (item-position IPS and the like) can reweight logged feedback later.

Policies are small classes with plain keyword arguments, so Hydra can build them
from ``_target_``. :class:`Thompson` ranks by draws from the learner's posterior rather
than by its scores; :func:`policy_scores` gives each policy what it ranks by.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

__all__ = ["Slate", "Greedy", "EpsilonSlots", "PlackettLuce", "Thompson", "policy_scores"]

RngLike = np.random.Generator | int | None


@dataclass(frozen=True)
class Slate:
    """A ranked list of shown candidates.

    Attributes
    ----------
    items
        (k,) indices into the ``scores`` the policy was given, in display order.
    positions
        (k,) the display position of each item, ``0`` is the top.
    propensities
        (k,) probability that the policy shows ``items[j]`` at ``positions[j]``.
    """

    items: np.ndarray
    positions: np.ndarray
    propensities: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


def _check(scores: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, max(0, min(int(k), len(scores)))


def _greedy_order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable")  # ties: the lower index first


def _slate(items: np.ndarray, marginals: np.ndarray) -> Slate:
    positions = np.arange(len(items))
    return Slate(items.astype(np.int64), positions, marginals[items, positions])


class Greedy:
    """The top k by score (ties: lower index first). Deterministic: propensities are 1.

    Examples
    --------
    >>> Greedy().select(np.array([0.1, 0.9, 0.5]), k=2, rng=0)
    Slate(items=array([1, 2]), positions=array([0, 1]), propensities=array([1., 1.]))
    """

    def select(self, scores: np.ndarray, k: int, rng: RngLike = None) -> Slate:
        scores, k = _check(scores, k)
        items = _greedy_order(scores)[:k]
        return Slate(items.astype(np.int64), np.arange(k), np.ones(k))

    def marginals(self, scores: np.ndarray, k: int) -> np.ndarray:
        """(n, k) matrix: ``P[i, p]`` = probability that item ``i`` is shown at position ``p``."""
        scores, k = _check(scores, k)
        out = np.zeros((len(scores), k))
        out[_greedy_order(scores)[:k], np.arange(k)] = 1.0
        return out

    def __repr__(self) -> str:
        return "Greedy()"


class EpsilonSlots:
    """Greedy, except ``n_explore`` of the k slots show uniformly random other items.

    The greedy top ``k - n_explore`` keep their relative order; the explore items
    are drawn uniformly without replacement from every candidate not in that greedy
    part (so they may include the greedy ranks just below it).

    Parameters
    ----------
    n_explore
        Explore slots per slate (fewer if the slate is shorter).
    slots
        ``"random"``: the explore slots are a uniformly random subset of the k
        positions, so every position gets explored and position effects can be
        estimated. ``"tail"``: they are the last positions (the top stays greedy).

    Examples
    --------
    >>> policy = EpsilonSlots(n_explore=1, slots="tail")
    >>> slate = policy.select(np.array([3.0, 2.0, 1.0, 0.0]), k=2, rng=0)
    >>> int(slate.items[0]), slate.propensities.tolist()   # explore: 1 of the 3 others
    (0, [1.0, 0.3333333333333333])
    """

    def __init__(self, n_explore: int = 2, slots: str = "random"):
        if n_explore < 0:
            raise ValueError(f"n_explore must be >= 0, got {n_explore}")
        if slots not in ("random", "tail"):
            raise ValueError(f"slots must be 'random' or 'tail', got {slots!r}")
        self.n_explore, self.slots = int(n_explore), slots

    def __repr__(self) -> str:
        return f"EpsilonSlots(n_explore={self.n_explore}, slots={self.slots!r})"

    def select(self, scores: np.ndarray, k: int, rng: RngLike = None) -> Slate:
        scores, k = _check(scores, k)
        rng = np.random.default_rng(rng)
        e = min(self.n_explore, k)
        order = _greedy_order(scores)
        greedy, pool = order[: k - e], order[k - e :]
        explore = rng.choice(pool, e, replace=False) if e else pool[:0]
        if self.slots == "random":
            is_explore = np.zeros(k, bool)
            is_explore[rng.choice(k, e, replace=False)] = True
        else:
            is_explore = np.arange(k) >= k - e
        items = np.empty(k, np.int64)
        items[is_explore] = explore
        items[~is_explore] = greedy
        return _slate(items, self.marginals(scores, k))

    def marginals(self, scores: np.ndarray, k: int) -> np.ndarray:
        """(n, k) matrix: ``P[i, p]`` = probability that item ``i`` is shown at position ``p``."""
        scores, k = _check(scores, k)
        n, e = len(scores), min(self.n_explore, k)
        order = _greedy_order(scores)
        out = np.zeros((n, k))
        pool = order[k - e :]
        if self.slots == "tail":
            out[order[: k - e], np.arange(k - e)] = 1.0
            out[np.ix_(pool, np.arange(k - e, k))] = 1.0 / len(pool) if e else 0.0
            return out
        # greedy rank j lands at position p iff p is not an explore slot and exactly
        # p - j of the p slots above it are: count such subsets of explore slots
        for j, item in enumerate(order[: k - e]):
            for p in range(j, min(j + e, k - 1) + 1):
                out[item, p] = comb(p, p - j) * comb(k - 1 - p, e - (p - j)) / comb(k, e)
        if e:
            out[pool, :] = (e / k) / len(pool)  # p is an explore slot, then one uniform draw of the pool
        return out


class PlackettLuce:
    """Sample a ranking from the Plackett-Luce model with weights ``exp(score / temperature)``.

    Position 1 is drawn with probability ``softmax(scores / T)``, position 2 from the
    rest, and so on (sampled with the Gumbel-top-k trick). ``T -> 0`` tends to
    greedy, ``T -> inf`` to uniform. A principled alternative to epsilon slots:
    every item can be shown, more often the better it scores.

    The propensity ``P(item i at position p)`` has no closed form; it is the
    exponential-race integral (each item arrives at an ``Exp(w_j)`` time, the
    ranking sorts arrival times)::

        P(i at p) = int_0^inf w_i e^{-w_i t} PoissonBinomial_p({1 - e^{-w_j t}}_{j != i}) dt

    computed with the trapezoidal rule in ``log t`` (about 200 nodes), which
    converges geometrically for this smooth, doubly-exponentially decaying
    integrand (checked against enumeration to 1e-12 in the tests). Cost:
    O(n * k * nodes) per shown item.

    Parameters
    ----------
    temperature
        Divides the scores. Scores are standardised head + residual, so ``T = 1``
        explores between items within about one head-std of each other.
    step
        Quadrature step in ``log t`` (0.2 gives ~1e-14 absolute error).

    Examples
    --------
    >>> policy = PlackettLuce(temperature=1.0)
    >>> m = policy.marginals(np.log([3.0, 1.0]), k=2)
    >>> np.round(m, 6).tolist()                      # 3:1 odds for the top slot
    [[0.75, 0.25], [0.25, 0.75]]
    >>> slate = policy.select(np.log([3.0, 1.0]), k=1, rng=0)
    >>> slate.propensities.round(6).tolist() in ([0.75], [0.25])
    True
    """

    def __init__(self, temperature: float = 1.0, step: float = 0.2):
        if not (0 < temperature < np.inf):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.temperature, self.step = float(temperature), float(step)

    def __repr__(self) -> str:
        return f"PlackettLuce(temperature={self.temperature})"

    def select(self, scores: np.ndarray, k: int, rng: RngLike = None) -> Slate:
        scores, k = _check(scores, k)
        rng = np.random.default_rng(rng)
        logits = scores / self.temperature
        items = np.argsort(-(logits + rng.gumbel(size=len(logits))), kind="stable")[:k]
        positions = np.arange(k)
        return Slate(items.astype(np.int64), positions, self._position_probs(logits, items, positions))

    def marginals(self, scores: np.ndarray, k: int) -> np.ndarray:
        """(n, k) matrix: ``P[i, p]`` = probability that item ``i`` is shown at position ``p``."""
        scores, k = _check(scores, k)
        n = len(scores)
        items, positions = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
        return self._position_probs(scores / self.temperature, items, positions).reshape(n, k)

    def _position_probs(self, logits: np.ndarray, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """P(items[s] at positions[s]) for each s, by the exponential-race integral."""
        out = np.zeros(len(items))
        if len(items) == 0:
            return out
        sel, inv = np.unique(items, return_inverse=True)  # one recursion per distinct item
        kmax = int(positions.max())
        # Time in units of item i's own mean arrival: s = w_i t. Then rival j arrives
        # before s with prob 1 - exp(-(w_j / w_i) s), and only weight *ratios* appear,
        # so no weight underflows however spread the scores are. Grid in log s: below
        # s = 1e-17 the integrand (< s) adds < 1e-17, above s = 50 it adds < e^-50.
        v = np.arange(np.log(1e-17), np.log(50.0) + self.step, self.step)
        s_ = np.exp(v)  # (G,)
        pb = np.zeros((len(sel), len(s_), kmax + 1))  # P(c rivals arrived before s), c <= kmax
        pb[:, :, 0] = 1.0
        for j in range(len(logits)):
            ratio = np.exp(np.clip(logits[j] - logits[sel], -800.0, 700.0))  # (U,) w_j / w_i
            q = -np.expm1(-ratio[:, None] * s_[None, :])  # (U, G)
            q[sel == j] = 0.0  # an item is not its own rival
            q = q[:, :, None]
            arrived = pb[:, :, :-1] * q
            pb *= 1 - q
            pb[:, :, 1:] += arrived
        density = s_ * np.exp(-s_)  # i arrives at s, per unit of log s
        out = np.einsum("g,sg->s", density, pb[inv, :, positions]) * self.step  # trapezoid: ends ~0
        return np.clip(out, 0.0, 1.0)


class Thompson:
    """Thompson sampling: show the top k of one draw of the scores from the learner's posterior.

    ``select`` takes ``samples`` (S, n): S draws of the n candidates' scores, from
    ``learner.sample_scores(user, query, ids, n_samples, rng)`` (a residual drawn from the
    key's posterior, ``m + q^{-1/2} eps``; see :func:`policy_scores`). The slate is the
    greedy top k of the first draw. A user the learner is sure about gets (nearly) the
    greedy slate; an uncertain one gets items whose score could be high.

    The propensity ``P(item i at position p)`` has no closed form; it is estimated by
    Monte Carlo as the fraction of the S draws whose top k puts ``i`` at ``p``. The shown
    draw is one of them, so a shown item's propensity is at least ``1 / S`` (never 0,
    which inverse-propensity weighting could not use); the standard error is at most
    ``0.5 / sqrt(S)``.

    Parameters
    ----------
    n_samples
        Draws per slate: one to rank by, all of them to estimate propensities.

    Examples
    --------
    >>> samples = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [3.0, 0.0, 2.0]])
    >>> slate = Thompson(n_samples=4).select(samples, k=2, rng=0)
    >>> slate.items.tolist(), slate.propensities.tolist()   # draw 0's top 2; item 0 leads 3 of 4 draws
    ([0, 2], [0.75, 0.5])
    """

    def __init__(self, n_samples: int = 100):
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.n_samples = int(n_samples)

    def __repr__(self) -> str:
        return f"Thompson(n_samples={self.n_samples})"

    @staticmethod
    def _check_samples(samples: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        samples = np.asarray(samples, np.float64)
        if samples.ndim != 2 or samples.shape[0] < 1:
            raise ValueError("Thompson ranks posterior draws: pass samples of shape (n_samples, n) from "
                             f"learner.sample_scores (see policy_scores), got shape {samples.shape}")
        if np.isnan(samples).any():
            raise ValueError("samples contain NaN")
        return samples, max(0, min(int(k), samples.shape[1]))

    def select(self, samples: np.ndarray, k: int, rng: RngLike = None) -> Slate:
        samples, k = self._check_samples(samples, k)
        items = _greedy_order(samples[0])[:k]
        positions = np.arange(k)
        return Slate(items.astype(np.int64), positions, self.marginals(samples, k)[items, positions])

    def marginals(self, samples: np.ndarray, k: int) -> np.ndarray:
        """(n, k) Monte Carlo estimate of ``P[i, p]``, the probability that item ``i`` is shown at ``p``."""
        samples, k = self._check_samples(samples, k)
        S, n = samples.shape
        tops = np.argsort(-samples, axis=1, kind="stable")[:, :k]  # (S, k)
        out = np.zeros((n, k))
        np.add.at(out, (tops, np.broadcast_to(np.arange(k), tops.shape)), 1.0)
        return out / S


def policy_scores(policy, learner, user, query, item_ids: np.ndarray, rng: RngLike = None) -> np.ndarray:
    """What ``policy.select`` ranks: the learner's scores, or for :class:`Thompson` its posterior draws.

    A learner without a posterior (``has_posterior`` false or absent: the SGD rules, the
    baselines) gives Thompson its scores as the one draw, so Thompson shows its greedy slate.
    """
    if isinstance(policy, Thompson):
        if getattr(learner, "has_posterior", False):
            return learner.sample_scores(user, query, item_ids, policy.n_samples, rng)
        return np.asarray(learner.score(user, query, item_ids))[None, :]
    return learner.score(user, query, item_ids)
