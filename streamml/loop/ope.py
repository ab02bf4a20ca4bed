"""Off-policy evaluation of slates: what a target policy's accepts per slate would be, from another policy's log.

The service logs, per slate, the shown items in display order, the logging policy's exact
propensity ``mu(item at its position)`` and the user's answer to each shown item. A target
policy is given as its **marginals** on each logged slate's candidates: ``q[i, p]``, the
probability that it would show candidate ``i`` at position ``p`` (``policy.marginals`` of
:mod:`streamml.online.policies`). Its value is ``V = mean over slates of sum_{i,p} q[i, p] r(i, p)``,
the expected accepts per slate, where ``r(i, p)`` is the mean answer to item ``i`` at ``p``.

Estimators (each returns per-slate terms; :func:`estimate` and :func:`bootstrap_ci` reduce them):

* :func:`ips` -- item-position IPS: ``sum_j q[a_j, j] / mu(a_j, j) * r_j`` over the shown
  ``(a_j, j)``. Unbiased when each answer depends on the item and its position only (no
  interactions between the shown items) and ``mu > 0`` wherever ``q > 0``.
* :func:`snips` -- the same weights self-normalised per position: ``sum_p (sum_n w_np r_np) /
  (sum_n w_np)``. Each position's weights have mean 1 under the logging policy, so this
  trades a small bias for much less variance when a few weights are large.
* :func:`pseudo_inverse` -- the PI estimator of Swaminathan et al. (2017), "Off-policy
  evaluation for slate recommendation": it sees only the **slate-level** reward
  ``R = sum_j r_j`` and weighs it by ``q^T Gamma^+ 1_s``, with ``1_s`` the slate's
  (item, position) indicator vector, ``q`` the target's marginals as a vector and
  ``Gamma = E_mu[1_s 1_s^T]`` the logging policy's second-moment matrix (pairs of
  (item, position) shown together), ``^+`` its pseudo-inverse. It is unbiased when the
  expected slate reward is additive over (item, position). Note that ``Gamma`` is not
  diagonal (a slate holds each position once and each item at most once), so PI is **not**
  the ratio of marginals: that ratio is item-position IPS, which needs the per-position
  answers. The service logs those, so IPS uses more information than PI; PI is here for
  rewards only known per slate, and ``Gamma`` needs the logging policy's joint law on the
  candidates (see :func:`logging_moments`), not just the logged propensities.
* :func:`doubly_robust` -- a reward model ``rhat`` (per item, e.g. the learner's predicted
  accept probability, or per item and position) as a control variate:
  ``sum_{i,p} q[i, p] rhat(i, p) + sum_j w_j (r_j - rhat(a_j, j))``. Unbiased like IPS for any
  ``rhat``; its variance is small when ``rhat`` is close to the answers.

:func:`bootstrap_ci` resamples slates, or whole users (``groups``) when a user has several
slates: one user's slates share the user's taste, so they are not independent draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, permutations

import numpy as np

__all__ = ["SlateLog", "Terms", "GroupSums", "ips", "snips", "pseudo_inverse", "doubly_robust", "estimate", "bootstrap_ci",
           "slate_moments", "logging_moments", "pi_weights", "slate_log_from_export", "ESTIMATORS",
           "snips_raw", "fill_empty_positions"]


@dataclass
class SlateLog:
    """A log of ``n`` slates, each over its own candidates.

    Attributes
    ----------
    shown
        ``n`` int arrays (k_n,): candidate indices of the shown items, in display order
        (position ``j`` is ``shown[n][j]``).
    rewards
        ``n`` arrays (k_n,): the answer to each shown item (1 accept, 0 reject).
    propensities
        ``n`` arrays (k_n,): the logging policy's probability of that item at that position.
    groups
        (n,) the cluster of each slate for the bootstrap (the user); None: every slate its own.
    source
        Names the log in error messages (a file, a table).
    """

    shown: Sequence[np.ndarray]
    rewards: Sequence[np.ndarray]
    propensities: Sequence[np.ndarray]
    groups: np.ndarray | None = None
    source: str = "the log"

    def __post_init__(self):
        n = len(self.shown)
        if len(self.rewards) != n or len(self.propensities) != n:
            raise ValueError(f"{self.source}: {n} slates but {len(self.rewards)} rewards and "
                             f"{len(self.propensities)} propensities")
        self.shown = [np.asarray(s, np.int64) for s in self.shown]
        self.rewards = [np.asarray(r, np.float64) for r in self.rewards]
        self.propensities = [np.asarray(p, np.float64) for p in self.propensities]
        for i, (s, r, p) in enumerate(zip(self.shown, self.rewards, self.propensities)):
            if not (len(s) == len(r) == len(p)):
                raise ValueError(f"{self.source}, slate {i}: {len(s)} shown items, {len(r)} rewards, {len(p)} propensities")
            if len(p) and not ((p > 0) & (p <= 1)).all():
                j = int(np.flatnonzero(~((p > 0) & (p <= 1)))[0])
                raise ValueError(f"{self.source}, slate {i}, position {j}: propensity {p[j]} is not in (0, 1]; "
                                 "a shown item's logging probability must be positive to reweight it")
            if not np.isfinite(r).all():
                raise ValueError(f"{self.source}, slate {i}: rewards are not finite: {r.tolist()}")
        if self.groups is not None:
            self.groups = np.asarray(self.groups)
            if len(self.groups) != n:
                raise ValueError(f"{self.source}: {len(self.groups)} groups for {n} slates")

    def __len__(self) -> int:
        return len(self.shown)


@dataclass
class Terms:
    """Per-slate terms of an estimator: the estimate is ``sum_j num[:, j].sum() / den[:, j].sum()``,
    with ``den`` None meaning ``/ n`` (a plain mean over slates). Sums of terms, so a bootstrap
    replicate (or a partition of the log) only needs per-cluster sums."""

    num: np.ndarray  # (n, J)
    den: np.ndarray | None = None  # (n, J)

    def value(self) -> float:
        if self.den is None:
            return float(self.num.sum(0).sum() / len(self.num))
        return float((self.num.sum(0) / self.den.sum(0)).sum())


def _check_target(log: SlateLog, target: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(target) != len(log):
        raise ValueError(f"{log.source}: {len(log)} slates but {len(target)} target marginal matrices")
    out = []
    for i, (q, s) in enumerate(zip(target, log.shown)):
        q = np.asarray(q, np.float64)
        if q.ndim != 2 or q.shape[1] != len(s) or (len(s) and s.max() >= q.shape[0]):
            raise ValueError(f"{log.source}, slate {i}: target marginals of shape {q.shape} do not fit a slate of "
                             f"{len(s)} positions over candidates up to {int(s.max()) if len(s) else -1}")
        if (q < -1e-12).any() or (q.sum(0) > 1 + 1e-6).any():
            raise ValueError(f"{log.source}, slate {i}: target marginals are not probabilities per position")
        out.append(q)
    return out


def _weights(log: SlateLog, target: list[np.ndarray]) -> list[np.ndarray]:
    """``w_j = q[a_j, j] / mu(a_j, j)`` per slate."""
    return [q[s, np.arange(len(s))] / p for q, s, p in zip(target, log.shown, log.propensities)]


def _per_position(rows: list[np.ndarray], k: int) -> np.ndarray:
    out = np.zeros((len(rows), k))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def ips(log: SlateLog, target: Sequence[np.ndarray]) -> Terms:
    """Item-position IPS: per slate ``sum_j q[a_j, j] / mu(a_j, j) * r_j``.

    >>> log = SlateLog(shown=[[1, 0]], rewards=[[1, 0]], propensities=[[0.5, 0.25]])
    >>> ips(log, [np.array([[0.0, 1.0], [1.0, 0.0]])]).value()   # 1/0.5 * 1 + 1/0.25 * 0
    2.0
    """
    target = _check_target(log, target)
    return Terms(np.array([[float(w @ r)] for w, r in zip(_weights(log, target), log.rewards)]).reshape(-1, 1))


def snips(log: SlateLog, target: Sequence[np.ndarray]) -> Terms:
    """Self-normalised item-position IPS: per position ``sum_n w_np r_np / sum_n w_np``, summed over positions.

    A position where every logged weight is 0 (the target never puts a logged item there)
    adds nothing rather than 0/0.
    """
    terms = snips_raw(log, target)
    return Terms(terms.num, fill_empty_positions(terms.den))


def snips_raw(log: SlateLog, target: Sequence[np.ndarray], k: int | None = None) -> Terms:
    """SNIPS's per-slate terms before :func:`fill_empty_positions`: what a partition of the log
    contributes (``k`` pads every partition to the same number of positions)."""
    target = _check_target(log, target)
    w = _weights(log, target)
    k = max((len(s) for s in log.shown), default=0) if k is None else k
    return Terms(_per_position([wi * r for wi, r in zip(w, log.rewards)], k), _per_position(w, k))


def fill_empty_positions(den: np.ndarray) -> np.ndarray:
    """A position where every weight is 0 (the target never puts a logged item there) adds
    nothing rather than 0/0: its denominators become ``1/n`` (0 / 1)."""
    den = den.copy()
    den[:, den.sum(0) == 0] = 1.0 / max(len(den), 1)
    return den


def doubly_robust(log: SlateLog, target: Sequence[np.ndarray], rhat: Sequence[np.ndarray]) -> Terms:
    """DR with a reward model: ``sum_{i,p} q[i, p] rhat(i, p) + sum_j w_j (r_j - rhat(a_j, j))`` per slate.

    ``rhat[n]`` is (m_n,) per candidate (the same at every position) or (m_n, k_n).
    """
    target = _check_target(log, target)
    if len(rhat) != len(log):
        raise ValueError(f"{log.source}: {len(log)} slates but {len(rhat)} reward-model arrays")
    out = np.zeros((len(log), 1))
    for i, (q, s, p, r, h) in enumerate(zip(target, log.shown, log.propensities, log.rewards, rhat)):
        h = np.asarray(h, np.float64)
        h = np.broadcast_to(h[:, None], q.shape) if h.ndim == 1 else h
        if h.shape != q.shape:
            raise ValueError(f"{log.source}, slate {i}: reward model of shape {h.shape}, target marginals {q.shape}")
        pos = np.arange(len(s))
        out[i, 0] = float((q * h).sum() + (q[s, pos] / p) @ (r - h[s, pos]))
    return Terms(out)


# --------------------------------------------------------------------------- pseudo-inverse
def slate_moments(slates: np.ndarray, probs: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``(marginals (m, k), Gamma (m k, m k))`` of a law over slates: ``probs[s]`` of slate ``slates[s]``.

    ``Gamma[(i, p), (j, p')]`` is the probability of ``i`` at ``p`` together with ``j`` at ``p'``
    (entry index ``item * k + position``).
    """
    slates = np.asarray(slates, np.int64)
    probs = np.asarray(probs, np.float64)
    S, k = slates.shape
    idx = slates * k + np.arange(k)  # (S, k) entries shown
    pairs = (idx[:, :, None] * (m * k) + idx[:, None, :]).reshape(S, -1)  # (S, k * k)
    gamma = np.bincount(pairs.ravel(), np.repeat(probs, k * k), minlength=(m * k) ** 2).reshape(m * k, m * k)
    return np.diag(gamma).reshape(m, k).copy(), gamma


def _epsilon_slates(policy, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every slate :class:`~streamml.online.policies.EpsilonSlots` can show, equally likely."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    k = min(k, len(order))
    e = min(policy.n_explore, k)
    greedy, pool = order[: k - e], order[k - e:]
    slot_sets = [tuple(range(k - e, k))] if policy.slots == "tail" else list(combinations(range(k), e))
    out = []
    for slots in slot_sets:
        rest = [p for p in range(k) if p not in slots]
        for draw in permutations(pool, e):
            slate = np.empty(k, np.int64)
            slate[list(rest)] = greedy
            slate[list(slots)] = draw
            out.append(slate)
    out = np.array(out, np.int64).reshape(-1, k)
    return out, np.full(len(out), 1.0 / len(out))


def logging_moments(policy, scores: np.ndarray, k: int, n_draws: int = 4000, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """The marginals and ``Gamma`` of a logging policy on one slate's candidates (see :func:`slate_moments`).

    Exact for :class:`~streamml.online.policies.Greedy` and ``EpsilonSlots`` (every slate
    enumerated); for ``PlackettLuce`` estimated from ``n_draws`` Gumbel-top-k draws (its
    slates are too many to enumerate), so PI under Plackett-Luce logging carries that
    Monte Carlo error.
    """
    from streamml.online.policies import EpsilonSlots, Greedy, PlackettLuce

    scores = np.asarray(scores, np.float64)
    m, k = len(scores), min(k, len(scores))
    if isinstance(policy, Greedy):
        slates, probs = np.argsort(-scores, kind="stable")[None, :k], np.ones(1)
    elif isinstance(policy, EpsilonSlots):
        slates, probs = _epsilon_slates(policy, scores, k)
    elif isinstance(policy, PlackettLuce):
        g = np.random.default_rng(rng).gumbel(size=(n_draws, m))
        slates = np.argsort(-(scores / policy.temperature + g), axis=1, kind="stable")[:, :k]
        probs = np.full(n_draws, 1.0 / n_draws)
    else:
        raise TypeError(f"no second moments for logging policy {policy!r}: Greedy, EpsilonSlots or PlackettLuce")
    return slate_moments(slates, probs, m)


def pi_weights(gamma: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """``Gamma^+ 1_s`` (m k,): the target-free part of a slate's PI weight, computed once per logged slate;
    the weight of any target ``q`` is then ``q.ravel() @ pi_weights(...)``."""
    k = len(shown)
    ind = np.zeros(gamma.shape[0])
    ind[np.asarray(shown) * k + np.arange(k)] = 1.0
    # entries the logging policy never shows have zero rows and columns in Gamma, and zero
    # entries in its pseudo-inverse: invert the rest only (much smaller under epsilon slots)
    live = np.flatnonzero(np.diag(gamma) > 0)
    out = np.zeros(gamma.shape[0])
    out[live] = np.linalg.pinv(gamma[np.ix_(live, live)], rcond=1e-10, hermitian=True) @ ind[live]
    return out


def pseudo_inverse(log: SlateLog, target: Sequence[np.ndarray], gammas: Sequence[np.ndarray] | None = None,
                   weights: Sequence[np.ndarray] | None = None) -> Terms:
    """PI: per slate ``R * q^T Gamma^+ 1_s`` with the slate reward ``R = sum_j r_j``.

    Give each slate's logging ``Gamma`` (:func:`logging_moments`) or, to evaluate many
    targets on one log, the precomputed :func:`pi_weights`.
    """
    target = _check_target(log, target)
    if weights is None:
        if gammas is None or len(gammas) != len(log):
            raise ValueError(f"{log.source}: PI needs one logging second-moment matrix (or pi_weights) per slate")
        weights = [pi_weights(g, s) for g, s in zip(gammas, log.shown)]
    out = np.zeros((len(log), 1))
    for i, (q, g, r) in enumerate(zip(target, weights, log.rewards)):
        if g.shape != (q.size,):
            raise ValueError(f"{log.source}, slate {i}: PI weights of shape {g.shape} for target marginals {q.shape}")
        out[i, 0] = r.sum() * float(q.ravel() @ g)
    return Terms(out)


ESTIMATORS = {"ips": ips, "snips": snips, "pi": pseudo_inverse, "dr": doubly_robust}


def slate_log_from_export(df, candidates: Sequence[np.ndarray] | None = None, source: str = "the export") -> SlateLog:
    """A :class:`SlateLog` from rows of the exported dataset (:mod:`streamml.loop.export`, a pandas frame).

    The reward of a shown item is 1 if it was accepted and 0 otherwise (rejected or no
    answer: accepts per slate count accepts only). ``candidates[n]`` lists the candidate ids of
    row ``n`` that the target's marginals index; None: the shown items themselves (positions
    within the slate). A reward whose label the log did not keep is an error naming the event:
    an estimate would silently count it as no accept.
    """
    shown, rewards = [], []
    for n, row in enumerate(df.itertuples(index=False)):
        items = np.asarray(row.items, np.int64)
        r = np.zeros(len(items))
        for x in row.rewards:
            if x["label"] is None or (isinstance(x["label"], float) and np.isnan(x["label"])):
                raise ValueError(f"{source}, event {row.event_id!r}: the reward of item {x['item']} has no label; the "
                                 "event log did not keep it (see streamml.loop.export), so accepts cannot be counted")
            r[int(x["position"])] = float(x["label"] == 1)
        if candidates is None:
            idx = np.arange(len(items))
        else:
            where = {int(c): i for i, c in enumerate(np.asarray(candidates[n]).tolist())}
            missing = [int(i) for i in items if int(i) not in where]
            if missing:
                raise ValueError(f"{source}, event {row.event_id!r}: shown items {missing} are not among its candidates")
            idx = np.array([where[int(i)] for i in items], np.int64)
        shown.append(idx)
        rewards.append(r)
    return SlateLog(shown, rewards, [np.asarray(p, np.float64) for p in df["propensities"]],
                    groups=df["user"].to_numpy(), source=source)


# --------------------------------------------------------------------------- reduction
def estimate(terms: Terms) -> float:
    """The point estimate of an estimator's terms."""
    return terms.value()


@dataclass
class GroupSums:
    """An estimator's terms summed per cluster (user): all an estimate and its bootstrap need. Sums
    of disjoint parts of a log add up (:meth:`merge`), so each partition of an export is reduced
    where it lies and only these travel (:mod:`streamml.loop.partitions`)."""

    groups: np.ndarray  # (G,) sorted cluster ids
    num: np.ndarray  # (G, J)
    den: np.ndarray  # (G, J): the clusters' summed denominators, or their slate counts (a plain mean)

    @classmethod
    def of(cls, terms: Terms, groups: np.ndarray | None = None) -> GroupSums:
        n = len(terms.num)
        groups = np.arange(n) if groups is None else np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} slates")
        ids, g = np.unique(groups, return_inverse=True)
        num = np.zeros((len(ids), terms.num.shape[1]))
        np.add.at(num, g, terms.num)
        den = np.zeros_like(num)
        np.add.at(den, g, np.ones_like(terms.num) if terms.den is None else terms.den)
        return cls(ids, num, den)

    @staticmethod
    def merge(parts: Sequence[GroupSums]) -> GroupSums:
        """The sums of the union of disjoint logs (a user's slates may lie in several parts)."""
        ids, g = np.unique(np.concatenate([p.groups for p in parts]), return_inverse=True)
        J = max(p.num.shape[1] for p in parts)  # raw SNIPS sums: a part with shorter slates has no terms past them

        def pad(a):
            return np.pad(a, ((0, 0), (0, J - a.shape[1])))

        num = np.zeros((len(ids), J))
        den = np.zeros_like(num)
        np.add.at(num, g, np.concatenate([pad(p.num) for p in parts]))
        np.add.at(den, g, np.concatenate([pad(p.den) for p in parts]))
        return GroupSums(ids, num, den)

    def value(self) -> float:
        return float((self.num.sum(0) / self.den.sum(0)).sum())


def bootstrap_ci(terms: Terms | GroupSums, groups: np.ndarray | None = None, level: float = 0.95, n_boot: int = 2000,
                 rng=None) -> tuple[float, float, float]:
    """``(estimate, low, high)``: a percentile bootstrap interval, resampling whole ``groups`` (users).

    Clusters are resampled with replacement, as many as there are; a replicate's estimate
    is recomputed from the resampled clusters' summed terms, so a ratio (SNIPS) is
    resampled as a ratio. ``terms`` may be :class:`GroupSums` already (``groups`` then unused).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(terms, Terms) and len(terms.num) == 0 or isinstance(terms, GroupSums) and len(terms.groups) == 0:
        raise ValueError("no slates to estimate from")
    sums = terms if isinstance(terms, GroupSums) else GroupSums.of(terms, groups)
    G = len(sums.groups)
    counts = np.random.default_rng(rng).multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(np.float64)  # (B, G)
    bn, bd = counts @ sums.num, counts @ sums.den  # (B, J)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.where(bd > 0, bn / np.where(bd > 0, bd, 1.0), 0.0).sum(1)
    a = (1 - level) / 2
    low, high = np.quantile(reps, [a, 1 - a])
    return terms.value(), float(low), float(high)
