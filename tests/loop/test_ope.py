"""Slate OPE: each estimator against values computed by hand on a tiny log, then unbiasedness by
enumerating every slate of a logging policy, and the bootstrap's clustering."""

from itertools import permutations, product

import numpy as np
import pytest

from streamml.loop.ope import (
    SlateLog,
    bootstrap_ci,
    doubly_robust,
    ips,
    logging_moments,
    pi_weights,
    pseudo_inverse,
    slate_moments,
    snips,
)
from streamml.online.policies import EpsilonSlots, Greedy, PlackettLuce

# Two slates of k = 2 over 3 candidates. Target 1 is deterministic: item 1 then item 0.
LOG = SlateLog(shown=[[1, 0], [2, 1]], rewards=[[1, 0], [0, 1]], propensities=[[0.5, 0.25], [0.25, 0.5]],
               groups=["alice", "bob"])
Q = [np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
     np.array([[0.0, 0.5], [0.5, 0.5], [0.5, 0.0]])]
# weights w = q[a_j, j] / mu: slate 1 [1/0.5, 1/0.25] = [2, 4]; slate 2 [0.5/0.25, 0.5/0.5] = [2, 1]


def test_ips_by_hand():
    # slate 1: 2*1 + 4*0 = 2; slate 2: 2*0 + 1*1 = 1; mean 1.5
    assert ips(LOG, Q).value() == pytest.approx(1.5)
    assert ips(LOG, Q).num.ravel().tolist() == pytest.approx([2.0, 1.0])


def test_snips_by_hand():
    # position 0: (2*1 + 2*0) / (2 + 2) = 0.5; position 1: (4*0 + 1*1) / (4 + 1) = 0.2
    assert snips(LOG, Q).value() == pytest.approx(0.7)


def test_snips_position_without_weight_adds_nothing():
    q = [np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])]
    # position 0: (2*1 + 4*0) / (2 + 4) = 1/3; position 1: no weight anywhere
    assert snips(LOG, q).value() == pytest.approx(1 / 3)


def test_doubly_robust_by_hand():
    rhat = [np.array([0.2, 0.6, 0.1]), np.array([0.5, 0.5, 0.5])]
    # slate 1: model 0.2*1 + 0.6*1 = 0.8, correction 2*(1 - 0.6) + 4*(0 - 0.2) = 0 -> 0.8
    # slate 2: model 0.5*(0.5 + 1 + 0.5) = 1.0, correction 2*(0 - 0.5) + 1*(1 - 0.5) = -0.5 -> 0.5
    assert doubly_robust(LOG, Q, rhat).value() == pytest.approx(0.65)
    # a perfect model of these answers needs no correction; a zero model is IPS
    assert doubly_robust(LOG, Q, [np.zeros(3), np.zeros(3)]).value() == pytest.approx(ips(LOG, Q).value())


def test_pi_is_ips_for_one_position():
    # a contextual bandit (k = 1): Gamma = diag(mu), so PI = 1 / 0.25 * reward
    log = SlateLog(shown=[[0]], rewards=[[1]], propensities=[[0.25]])
    _, gamma = slate_moments(np.array([[0], [1]]), np.array([0.25, 0.75]), m=2)
    assert np.allclose(gamma, np.diag([0.25, 0.75]))
    assert pseudo_inverse(log, [np.array([[1.0], [0.0]])], gammas=[gamma]).value() == pytest.approx(4.0)


def test_pi_by_hand_two_slates():
    # logging shows [0, 1] w.p. 0.25 and [1, 0] w.p. 0.75; indicators (index item*k + p) are
    # e1 = [1, 0, 0, 1] and e2 = [0, 1, 1, 0], so Gamma^+ = e1 e1^T + e2 e2^T / 3 and
    # Gamma^+ 1_{[0, 1]} = 2 e1: the weight of target [0, 1] (q = e1) is 4, of target [1, 0] is 0
    _, gamma = slate_moments(np.array([[0, 1], [1, 0]]), np.array([0.25, 0.75]), m=2)
    assert pi_weights(gamma, np.array([0, 1])) == pytest.approx([2.0, 0.0, 0.0, 2.0])
    log = SlateLog(shown=[[0, 1]], rewards=[[1, 0]], propensities=[[0.25, 0.25]])
    assert pseudo_inverse(log, [np.eye(2)], gammas=[gamma]).value() == pytest.approx(4.0)  # R = 1
    assert pseudo_inverse(log, [np.eye(2)[::-1]], gammas=[gamma]).value() == pytest.approx(0.0)


def test_pi_matches_the_papers_closed_form_for_uniform_independent_slots():
    # Swaminathan et al. (2017): uniform logging over m actions per slot, slots independent:
    # the PI weight is m * sum_j q(j, s_j) - l + 1
    m, slots = 3, 2
    slates = np.array([[a, m + b] for a, b in product(range(m), range(m))])  # slot p picks from block p
    _, gamma = slate_moments(slates, np.full(len(slates), 1 / len(slates)), m * slots)
    rng = np.random.default_rng(0)
    q = np.zeros((m * slots, slots))
    q[:m, 0], q[m:, 1] = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(m))
    for s in slates:
        assert q.ravel() @ pi_weights(gamma, s) == pytest.approx(m * q[s, np.arange(slots)].sum() - slots + 1)


def _plackett_luce_law(scores, k):
    """Every slate of Plackett-Luce and its probability, by the chain rule."""
    w = np.exp(scores)
    slates = np.array(list(permutations(range(len(scores)), k)))
    probs = []
    for s in slates:
        left, p = w.sum(), 1.0
        for i in s:
            p *= w[i] / left
            left -= w[i]
        probs.append(p)
    return slates, np.array(probs)


def test_every_estimator_is_unbiased_under_additive_rewards():
    """Expectation over every slate the logging policy can show equals the target's value."""
    rng = np.random.default_rng(3)
    m, k = 4, 2
    slates, probs = _plackett_luce_law(np.array([0.5, -0.2, 1.0, 0.0]), k)
    marg, gamma = slate_moments(slates, probs, m)
    assert marg == pytest.approx(PlackettLuce(1.0).marginals(np.array([0.5, -0.2, 1.0, 0.0]), k), abs=1e-9)
    q = PlackettLuce(0.5).marginals(np.array([-1.0, 2.0, 0.3, 0.1]), k)
    phi = rng.random((m, k))  # mean answer of item i at position p
    truth = (q * phi).sum()
    rhat = rng.random(m)
    pos = np.arange(k)
    log = SlateLog(shown=list(slates), rewards=[phi[s, pos] for s in slates],
                   propensities=[marg[s, pos] for s in slates])
    targets = [q] * len(slates)
    for name, terms in [("ips", ips(log, targets)), ("dr", doubly_robust(log, targets, [rhat] * len(slates))),
                        ("pi", pseudo_inverse(log, targets, gammas=[gamma] * len(slates)))]:
        assert probs @ terms.num[:, 0] == pytest.approx(truth), name


def test_epsilon_slots_enumeration_matches_its_marginals():
    scores = np.array([0.3, 2.0, -1.0, 0.5, 1.1, 0.0])
    for policy in (EpsilonSlots(2, "random"), EpsilonSlots(1, "tail"), Greedy()):
        marg, gamma = logging_moments(policy, scores, k=3)
        assert marg == pytest.approx(policy.marginals(scores, 3))
        assert np.allclose(np.diag(gamma), marg.ravel())  # a pair of an entry with itself is its marginal


def test_plackett_luce_moments_by_sampling_are_close():
    scores = np.array([0.5, -0.2, 1.0, 0.0])
    marg, _ = logging_moments(PlackettLuce(1.0), scores, k=2, n_draws=20000, rng=0)
    assert marg == pytest.approx(PlackettLuce(1.0).marginals(scores, 2), abs=0.015)


def test_bootstrap_resamples_users_not_slates():
    # alice's 10 slates all score 1, bob's 10 all score 0: slates look independent but only two users exist
    terms = ips(SlateLog(shown=[[0]] * 20, rewards=[[1]] * 10 + [[0]] * 10, propensities=[[1.0]] * 20),
                [np.array([[1.0]])] * 20)
    users = ["alice"] * 10 + ["bob"] * 10
    est, lo, hi = bootstrap_ci(terms, users, n_boot=4000, rng=0)
    _, lo_s, hi_s = bootstrap_ci(terms, None, n_boot=4000, rng=0)
    assert est == 0.5
    assert (lo, hi) == (0.0, 1.0)  # resampling 2 users: both alice, both bob, or one each
    assert 0.2 < lo_s < 0.5 < hi_s < 0.8  # resampling 20 slates: much narrower, and wrongly so


def test_bootstrap_keeps_snips_a_ratio():
    est, lo, hi = bootstrap_ci(snips(LOG, Q), LOG.groups, n_boot=500, rng=1)
    assert est == pytest.approx(0.7)
    assert lo <= est <= hi


def test_bad_input_names_the_slate():
    with pytest.raises(ValueError, match="slate 1, position 0: propensity 0.0"):
        SlateLog(shown=[[0], [1]], rewards=[[1], [0]], propensities=[[0.5], [0.0]], source="log.parquet")
    with pytest.raises(ValueError, match="slate 0: target marginals of shape"):
        ips(LOG, [np.ones((1, 2)), Q[1]])
