"""DR's reward model fitted to the log: it recovers a head's link per query, whatever the head's
scale or sign, falls back to the global link for an unseen query, and names bad input."""

import numpy as np
import pytest

from streamml.loop.reward_model import PlattRewardModel


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def slates(rng, links: dict, n=3000, k=3):
    """Slates of ``k`` shown items per query; answers drawn from ``sigmoid(a s + b)`` of the query's link."""
    scores, queries, rewards = [], [], []
    for q, (a, b) in links.items():
        for _ in range(n // k):
            s = rng.standard_normal(k) * 2
            scores.append(s)
            queries.append(q)
            rewards.append((rng.random(k) < _sigmoid(a * s + b)).astype(float))
    return scores, queries, rewards


def test_each_query_gets_its_own_link_even_one_that_points_the_wrong_way():
    rng = np.random.default_rng(0)
    links = {"right": (1.5, -0.5), "wrong": (-2.0, 0.3)}  # "wrong": the head scores rejected items highest
    model = PlattRewardModel().fit(*slates(rng, links))
    grid = np.linspace(-2, 2, 9)
    for q, (a, b) in links.items():
        np.testing.assert_allclose(model.predict(grid, q), _sigmoid(a * grid + b), atol=0.05)


def test_a_query_the_training_slates_never_had_gets_the_global_link():
    rng = np.random.default_rng(1)
    model = PlattRewardModel().fit(*slates(rng, {"a": (1.0, 0.0), "b": (1.0, 0.0)}))
    grid = np.linspace(-2, 2, 5)
    np.testing.assert_allclose(model.predict(grid, "never seen"), _sigmoid(grid), atol=0.05)


@pytest.mark.parametrize("a, b", [(10.0, 3.0), (0.01, -1.0), (-4.0, 0.0)])
def test_the_fit_does_not_depend_on_the_heads_scale_offset_or_sign(a, b):
    """Scores are standardised before the fit, so an affine change of the head changes no prediction."""
    rng = np.random.default_rng(2)
    scores, queries, rewards = slates(rng, {"q": (1.0, 0.2)}, n=900)
    base = PlattRewardModel().fit(scores, queries, rewards)
    moved = PlattRewardModel().fit([a * s + b for s in scores], queries, rewards)
    grid = np.linspace(-2, 2, 5)
    np.testing.assert_allclose(moved.predict(a * grid + b, "q"), base.predict(grid, "q"), atol=1e-4)


@pytest.mark.parametrize("rewards, message", [
    ([np.ones(3), np.ones(3)], "are all accepted"),
    ([np.zeros(3), np.zeros(3)], "are all not accepted"),
    ([np.array([0, 1, 2.0]), np.zeros(3)], "rewards must be 0 or 1"),
    ([np.array([0, 1.0]), np.zeros(3)], "5 scores but 6 rewards"),
])
def test_training_slates_it_cannot_learn_from_are_named(rewards, message):
    scores = [np.arange(3.0), np.arange(3.0)] if "5 scores" not in message else [np.arange(2.0), np.arange(3.0)]
    if "5 scores" in message:
        rewards = [np.array([0, 1.0, 1.0]), np.zeros(3)]
    with pytest.raises(ValueError, match=message):
        PlattRewardModel().fit(scores, ["q", "q"], rewards)


def test_other_bad_input_is_named():
    with pytest.raises(ValueError, match="2 score arrays, 1 queries and 2 reward arrays"):
        PlattRewardModel().fit([np.zeros(2), np.zeros(2)], ["q"], [np.zeros(2), np.ones(2)])
    with pytest.raises(ValueError, match="not all finite"):
        PlattRewardModel().fit([np.array([0.0, np.nan])], ["q"], [np.array([0.0, 1.0])])
    with pytest.raises(ValueError, match="C must be > 0"):
        PlattRewardModel(C=0)
    with pytest.raises(RuntimeError, match="fit the reward model before predicting"):
        PlattRewardModel().predict(np.zeros(2), "q")
