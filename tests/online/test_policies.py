import itertools
import math

import numpy as np
import pytest

from streamml.online.policies import EpsilonSlots, Greedy, PlackettLuce, Slate

POLICIES = {
    "greedy": Greedy(),
    "eps-random": EpsilonSlots(n_explore=2),
    "eps-tail": EpsilonSlots(n_explore=2, slots="tail"),
    "pl": PlackettLuce(temperature=0.7),
}
SCORES = np.array([0.3, 2.0, -1.0, 0.9, 0.9, 1.5, -0.2])


@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    return POLICIES[request.param]


def test_greedy_is_argsort_top_k():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(50)
    slate = Greedy().select(scores, 10, rng)
    np.testing.assert_array_equal(slate.items, np.argsort(-scores)[:10])
    np.testing.assert_array_equal(slate.positions, np.arange(10))
    np.testing.assert_array_equal(slate.propensities, 1.0)
    # ties go to the lower index
    np.testing.assert_array_equal(Greedy().select(np.array([1.0, 2.0, 2.0, 1.0]), 3).items, [1, 2, 0])


@pytest.mark.parametrize("k", [1, 3, 5, 7, 10])
def test_slates_are_valid(policy, k):
    for seed in range(20):
        slate = policy.select(SCORES, k, np.random.default_rng(seed))
        assert isinstance(slate, Slate)
        k_eff = min(k, len(SCORES))
        assert len(slate) == k_eff
        assert len(set(slate.items.tolist())) == k_eff  # no repeats
        assert set(slate.items.tolist()) <= set(range(len(SCORES)))
        np.testing.assert_array_equal(slate.positions, np.arange(k_eff))
        assert ((slate.propensities > 0) & (slate.propensities <= 1 + 1e-12)).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_marginals_are_doubly_sub_stochastic(policy, k):
    """Each position shows exactly one item; each item is shown at most once."""
    m = policy.marginals(SCORES, k)
    assert m.shape == (len(SCORES), k)
    assert (m >= 0).all()
    np.testing.assert_allclose(m.sum(0), 1.0, atol=1e-10)
    assert (m.sum(1) <= 1 + 1e-10).all()
    if k == len(SCORES):
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-10)


def test_propensities_are_the_marginals_of_the_shown_pairs(policy):
    for seed in range(5):
        slate = policy.select(SCORES, 4, seed)
        m = policy.marginals(SCORES, 4)
        np.testing.assert_allclose(slate.propensities, m[slate.items, slate.positions], rtol=1e-12)


@pytest.mark.parametrize("name", ["eps-random", "eps-tail", "pl"])
def test_propensities_match_empirical_frequencies(name):
    policy = POLICIES[name]
    k, n_draws = 3, 20_000
    rng = np.random.default_rng(123)
    counts = np.zeros((len(SCORES), k))
    for _ in range(n_draws):
        slate = policy.select(SCORES, k, rng)
        counts[slate.items, slate.positions] += 1
    m = policy.marginals(SCORES, k)
    sigma = np.sqrt(m * (1 - m) / n_draws) + 1e-12
    z = np.abs(counts / n_draws - m) / sigma
    assert z.max() < 5, (counts / n_draws, m)


def test_epsilon_slots_closed_form():
    scores = np.arange(6.0)[::-1]  # greedy order 0, 1, 2, ...
    m = EpsilonSlots(n_explore=1).marginals(scores, 3)
    # the explore slot is position 0, 1 or 2 (1/3 each); the pool is items 2..5 (4 items)
    # slot 0 -> greedy at (1, 2); slot 1 -> (0, 2); slot 2 -> (0, 1)
    np.testing.assert_allclose(m[0], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(m[1], [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(m[2:], 1 / 3 / 4)
    tail = EpsilonSlots(n_explore=1, slots="tail").marginals(scores, 3)
    np.testing.assert_allclose(tail[:2, :2], np.eye(2))
    np.testing.assert_allclose(tail[2:, 2], 1 / 4)
    # no exploration: greedy
    np.testing.assert_array_equal(EpsilonSlots(n_explore=0).marginals(scores, 3), Greedy().marginals(scores, 3))
    # all slots explore: uniform
    np.testing.assert_allclose(EpsilonSlots(n_explore=3).marginals(scores, 3), 1 / 6)


def brute_force_pl(logits, k):
    w = np.exp(logits - logits.max())
    n = len(w)
    m = np.zeros((n, k))
    for perm in itertools.permutations(range(n), k):
        p, used = 1.0, set()
        for item in perm:
            p *= w[item] / math.fsum(w[j] for j in range(n) if j not in used)
            used.add(item)
        for pos, item in enumerate(perm):
            m[item, pos] += p
    return m


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 5.0])
def test_plackett_luce_marginals_match_enumeration(temperature):
    rng = np.random.default_rng(7)
    for _ in range(3):
        scores = rng.standard_normal(6) * 3
        np.testing.assert_allclose(
            PlackettLuce(temperature).marginals(scores, 4), brute_force_pl(scores / temperature, 4), atol=1e-12
        )


def test_plackett_luce_temperature_limits():
    scores = np.array([1.0, 0.0, 2.0])
    np.testing.assert_allclose(PlackettLuce(1e-3).marginals(scores, 3), Greedy().marginals(scores, 3), atol=1e-12)
    np.testing.assert_allclose(PlackettLuce(1e6).marginals(scores, 3), 1 / 3, atol=1e-5)
    np.testing.assert_allclose(PlackettLuce(1.0).marginals(scores, 1)[:, 0], np.exp(scores) / np.exp(scores).sum())


def test_seeded_determinism(policy):
    a = policy.select(SCORES, 4, np.random.default_rng(42))
    b = policy.select(SCORES, 4, 42)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.propensities, b.propensities)


def test_stochastic_policies_do_explore():
    shown = {name: set() for name in ("eps-random", "pl")}
    for seed in range(200):
        for name in shown:
            shown[name].update(POLICIES[name].select(SCORES, 2, seed).items.tolist())
    assert all(s == set(range(len(SCORES))) for s in shown.values())


def test_edge_cases(policy):
    assert len(policy.select(SCORES, 0, 0)) == 0
    assert len(policy.select(np.array([]), 3, 0)) == 0
    one = policy.select(np.array([5.0]), 3, 0)
    assert one.items.tolist() == [0] and one.propensities.tolist() == pytest.approx([1.0])
    with pytest.raises(ValueError):
        policy.select(np.array([1.0, np.nan]), 1, 0)
    with pytest.raises(ValueError):
        policy.select(np.ones((2, 2)), 1, 0)


def test_policy_validation():
    with pytest.raises(ValueError):
        EpsilonSlots(n_explore=-1)
    with pytest.raises(ValueError):
        EpsilonSlots(slots="middle")
    with pytest.raises(ValueError):
        PlackettLuce(temperature=0)


# ------------------------------------------------------------------ Thompson
def test_thompson_shows_the_top_k_of_the_first_draw_with_monte_carlo_propensities():
    from streamml.online.policies import Thompson

    rng = np.random.default_rng(0)
    samples = rng.standard_normal((50, 7)) + SCORES
    slate = Thompson(n_samples=50).select(samples, 3, rng)
    np.testing.assert_array_equal(slate.items, np.argsort(-samples[0], kind="stable")[:3])
    tops = np.argsort(-samples, axis=1, kind="stable")[:, :3]
    for item, p, prop in zip(slate.items, slate.positions, slate.propensities):
        assert prop == np.mean(tops[:, p] == item) >= 1 / 50
    m = Thompson(n_samples=50).marginals(samples, 3)
    np.testing.assert_allclose(m.sum(0), 1.0)  # each position holds exactly one item per draw
    assert (m.sum(1) <= 1 + 1e-12).all()


def test_thompson_propensities_converge_to_the_exact_ones():
    """Two items with independent Gaussian scores: P(item 0 first) = Phi((mu0 - mu1) / sqrt(2))."""
    from scipy.stats import norm

    from streamml.online.policies import Thompson

    rng = np.random.default_rng(1)
    samples = rng.standard_normal((40_000, 2)) + [0.5, 0.0]
    m = Thompson(n_samples=40_000).marginals(samples, 1)
    assert abs(m[0, 0] - norm.cdf(0.5 / np.sqrt(2))) < 0.01


def test_thompson_with_a_confident_posterior_is_greedy():
    from streamml.online.policies import Thompson

    samples = np.tile(SCORES, (20, 1)) + 1e-9 * np.random.default_rng(2).standard_normal((20, 7))
    slate = Thompson(n_samples=20).select(samples, 2, 0)  # (positions 3 and 4 tie at 0.9)
    np.testing.assert_array_equal(slate.items, Greedy().select(SCORES, 2).items)
    np.testing.assert_array_equal(slate.propensities, 1.0)


def test_thompson_needs_posterior_draws():
    from streamml.online.policies import Thompson

    with pytest.raises(ValueError, match="sample_scores"):
        Thompson().select(SCORES, 3, 0)
    with pytest.raises(ValueError, match="n_samples"):
        Thompson(n_samples=0)


def test_policy_scores_draws_from_the_learner_for_thompson_only():
    from streamml.online import DiagonalLaplace, ResidualLearner
    from streamml.online.policies import Thompson, policy_scores

    X = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    learner = ResidualLearner(X, np.zeros(10, int), rule=DiagonalLaplace(), head_scores=np.arange(10.0))
    ids = np.arange(10)
    np.testing.assert_array_equal(policy_scores(Greedy(), learner, 1, 0, ids), learner.score(1, 0, ids))
    draws = policy_scores(Thompson(n_samples=30), learner, 1, 0, ids, rng=0)
    assert draws.shape == (30, 10)
    slate = Thompson(n_samples=30).select(draws, 3, 0)
    assert len(slate) == 3 and (slate.propensities > 0).all()
    sgd = ResidualLearner(X, np.zeros(10, int), head_scores=np.arange(10.0))  # no posterior: greedy
    slate = Thompson(n_samples=30).select(policy_scores(Thompson(n_samples=30), sgd, 1, 0, ids, rng=0), 3, 0)
    assert slate.items.tolist() == [9, 8, 7] and slate.propensities.tolist() == [1.0, 1.0, 1.0]


def test_thompson_config_builds_the_policy():
    from pathlib import Path

    import yaml
    from hydra.utils import instantiate

    from streamml.online.policies import Thompson

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "explore" / "thompson.yaml").read_text())
    policy = instantiate(cfg)
    assert isinstance(policy, Thompson) and policy.n_samples == Thompson().n_samples


def test_thompson_through_the_simulator(tmp_path):
    """Thompson slates from a Laplace residual in simulate.interact: logged Monte Carlo
    propensities, exploration for the learner with a posterior, greedy for the one without."""
    from conftest import write_queries
    from streamml.data import load_queries
    from streamml.offline.baselines import SklearnLR
    from streamml.online import DiagonalLaplace, ResidualLearner, scenarios, simulate
    from streamml.online.baselines import HeadOnly
    from streamml.online.policies import Thompson

    data = load_queries(write_queries(tmp_path, n_queries=2, n_per_class=14, dim=16), embedding_dim=16, min_per_class=1)
    world = scenarios.real_users(data, SklearnLR(), "test", seed=0, users={"flip_cluster": 2, "none": 1})
    learners = {"laplace": lambda X, q, h: ResidualLearner(X, q, rule=DiagonalLaplace(prior_var=3.0), head_scores=h),
                "head_only": HeadOnly}
    rounds, shown = simulate.interact(world, learners, Thompson(n_samples=50), k=3, n_rounds=3, seed=0, progress=False)
    assert set(shown.learner) == {"laplace", "head_only"}
    assert ((shown.propensity > 0) & (shown.propensity <= 1)).all()
    assert (shown[shown.learner == "head_only"].propensity == 1.0).all()
    assert (shown[shown.learner == "laplace"].propensity < 1.0).any()
