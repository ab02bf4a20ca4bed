"""The rules' numpy references against their definitions (autograd, hand-computed steps)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from streamml.online.rules import Catalog, DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, Rule, WindowMAP

CONFIGS = Path(__file__).parents[2] / "configs"
SGD_RULES = {"pointwise": PointwiseSGD, "pairwise": PairwiseSGD}


def unit_rows(rng, n, d):
    X = rng.standard_normal((n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    return rng, Catalog(unit_rows(rng, 30, 8), rng.standard_normal(30).astype(np.float32))


def loss_by_definition(name, r, item, label, buffer, X, z):
    """The rules' losses written from their definitions, for autograd (r: torch (D,))."""
    s = X @ r + z
    sign = 1.0 if label else -1.0
    if name == "pointwise":
        return torch.nn.functional.softplus(-sign * s[item])
    opp = [j for j in buffer[0 if label else 1].tolist() if j >= 0]
    if not opp:
        return torch.zeros((), dtype=r.dtype)
    return torch.nn.functional.softplus(-sign * (s[item] - s[opp])).mean()


@pytest.mark.parametrize("name", sorted(SGD_RULES))
def test_sgd_reference_is_a_shrunk_gradient_step_then_the_cap(name, toy):
    rng, cat = toy
    rule = SGD_RULES[name](lr=0.7, l2=0.05, decay=0.1, max_norm=2.0)
    X, z = torch.tensor(cat.embeddings, dtype=torch.float64), torch.tensor(cat.head, dtype=torch.float64)
    capped = 0
    for trial in range(20):
        item, label = int(rng.integers(30)), bool(rng.integers(2))
        r0 = (rng.standard_normal(8) * (0.1 + trial / 8)).astype(np.float32)
        state = {"residual": r0.copy(), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
        if name == "pairwise":
            state["buffer"][:, :2] = rng.integers(0, 30, (2, 2))  # two of four slots per label filled
        buffer = state.get("buffer", np.zeros((2, 0), np.int32)).copy()
        rt = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
        loss_by_definition(name, rt, item, label, buffer, X, z).backward()
        want = (1 - 0.1 - 0.7 * 0.05) * r0 - 0.7 * rt.grad.numpy()
        norm = np.linalg.norm(want)
        capped += norm > 2.0
        want = want * min(1.0, 2.0 / norm)
        rule.reference(state, cat.embeddings[item], float(cat.head[item]), label, cat, item=item)
        np.testing.assert_allclose(state["residual"], want, rtol=1e-5, atol=1e-6)
    assert 0 < capped < 20  # both sides of the cap were exercised


def test_pairwise_buffers_keep_the_newest_items_per_label(toy):
    _, cat = toy
    rule = PairwiseSGD(buffer_size=4)
    state = {"residual": np.zeros(8, np.float32), "buffer": np.full((2, 2), -1, np.int32)}
    for item, label in ((3, 0), (4, 1), (5, 0), (6, 0), (7, 1)):
        rule.reference(state, cat.embeddings[item], 0.0, bool(label), cat, item=item)
    assert state["buffer"].tolist() == [[6, 5], [7, 4]]  # row 0 rejected, row 1 accepted; newest first
    rule.reference(state, cat.embeddings[9], 0.0, True, cat, item=-1)  # an embedding outside the catalog
    assert state["buffer"].tolist() == [[6, 5], [7, 4]]


def test_pairwise_without_opposite_items_only_shrinks(toy):
    _, cat = toy
    rule = PairwiseSGD(lr=1.0, decay=0.5)
    state = {"residual": np.ones(8, np.float32), "buffer": np.full((2, 4), -1, np.int32)}
    state["buffer"][1, 0] = 2  # an accepted item, but the new event is an accept too
    rule.reference(state, cat.embeddings[0], 0.0, True, cat, item=0)
    np.testing.assert_array_equal(state["residual"], 0.5)


def test_laplace_step_is_the_diagonal_newton_step_with_the_prior(toy):
    rng, cat = toy
    rule = DiagonalLaplace(prior_var=2.0)
    m, a = rng.standard_normal(8).astype(np.float32) * 0.3, rng.random(8).astype(np.float32)
    state = {"residual": m.copy(), "evidence": a.copy()}
    x, z = cat.embeddings[4], float(cat.head[4])
    rule.reference(state, x, z, False, cat, item=4)
    p = 1 / (1 + np.exp(-(z + x.astype(np.float64) @ m)))
    a_new = a + p * (1 - p) * x.astype(np.float64) ** 2
    np.testing.assert_allclose(state["evidence"], a_new, rtol=1e-6)
    np.testing.assert_allclose(state["residual"], m + (0 - p) * x / (0.5 + a_new), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rule.variance(state), 1 / (0.5 + a_new), rtol=1e-6)


def test_laplace_steps_shrink_as_evidence_builds(toy):
    _, cat = toy
    rule = DiagonalLaplace(prior_var=1.0)
    state = {"residual": np.zeros(8, np.float32), "evidence": np.zeros(8, np.float32)}
    x = cat.embeddings[0]
    moves = []
    for t in range(30):  # the same item, alternately accepted and rejected: no net preference
        before = state["residual"].copy()
        rule.reference(state, x, 0.0, bool(t % 2), cat, item=0)
        moves.append(np.linalg.norm(state["residual"] - before))
    assert moves[-1] < 0.5 * moves[0]
    assert (np.diff(state["evidence"]) != 0).any() and (state["evidence"] > 0).all()
    assert (rule.variance(state) < 1.0).all()  # the posterior is tighter than the prior


def test_isotropic_laplace_step_uses_the_whole_curvature(toy):
    rng, cat = toy
    rule = IsotropicLaplace(prior_var=4.0)
    m = (rng.standard_normal(8) * 0.3).astype(np.float32)
    state = {"residual": m.copy(), "evidence": np.float32(0.7)}
    x, z = cat.embeddings[5], float(cat.head[5])
    rule.reference(state, x, z, True, cat, item=5)
    p = 1 / (1 + np.exp(-(z + x.astype(np.float64) @ m)))
    a = 0.7 + p * (1 - p) * float(x.astype(np.float64) @ x)
    np.testing.assert_allclose(float(state["evidence"]), a, rtol=1e-6)
    np.testing.assert_allclose(state["residual"], m + (1 - p) * x / (0.25 + a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rule.variance(state), [1 / (0.25 + a)], rtol=1e-6)
    steps = []
    for t in range(20):  # the step on the same event shrinks as the key's evidence grows
        before = state["residual"].copy()
        rule.reference(state, x, z, bool(t % 2), cat, item=5)
        steps.append(np.linalg.norm(state["residual"] - before))
    assert steps[-1] < 0.7 * steps[0]


def map_by_definition(X, z, labels, prior_var, head_var):
    """The posterior maximum of (r, v) over all events, by L-BFGS in float64 (no window)."""
    from scipy.optimize import minimize

    D = X.shape[1]

    def f(theta):
        r, v = theta[:D], theta[D]
        s = (1 + v) * z + X @ r
        g = 0.5 * (1 + np.tanh(0.5 * s)) - labels
        loss = np.sum(np.logaddexp(0, s) - labels * s) + r @ r / (2 * prior_var) + v * v / (2 * head_var)
        return loss, np.concatenate([X.T @ g + r / prior_var, [g @ z + v / head_var]])

    theta = minimize(f, np.zeros(D + 1), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}).x
    return theta[:D], theta[D]


def test_window_map_is_the_posterior_maximum_of_the_events_in_its_window(toy):
    rng, cat = toy
    rule = WindowMAP(prior_var=3.0, window=8, newton_steps=4, head_var=0.5)
    state = {"residual": np.zeros(8, np.float32), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
    items, labels = rng.integers(0, 30, 6), rng.integers(0, 2, 6).astype(float)
    for item, label in zip(items.tolist(), labels.tolist()):
        rule.reference(state, cat.embeddings[item], float(cat.head[item]), bool(label), cat, item=item)
    r, v = map_by_definition(cat.embeddings[items].astype(np.float64), cat.head[items].astype(np.float64), labels, 3.0, 0.5)
    np.testing.assert_allclose(state["residual"], r, atol=1e-4)
    np.testing.assert_allclose(float(state["head_weight"]), v, atol=1e-4)
    codes = state["window"][:6]
    np.testing.assert_array_equal(np.abs(codes) - 1, items)  # oldest first, sign = label
    np.testing.assert_array_equal(codes > 0, labels > 0)
    assert (state["window"][6:] == 0).all()


def test_window_map_one_joint_step_lands_near_the_posterior_maximum():
    """The new event's own Newton step starts the joint solve close to its end: one joint step per
    event tracks the maximum (the new coefficient started at 0 fails both bounds on these streams)."""
    errors = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        cat = Catalog(unit_rows(rng, 30, 8), rng.normal(size=30).astype(np.float32))
        items, labels = rng.integers(0, 30, 6), rng.integers(0, 2, 6).astype(float)
        rule = WindowMAP(prior_var=3.0, window=8, newton_steps=1, head_var=0.5)
        state = {"residual": np.zeros(8, np.float32), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
        for item, label in zip(items.tolist(), labels.tolist()):
            rule.reference(state, cat.embeddings[item], float(cat.head[item]), bool(label), cat, item=item)
        r, _ = map_by_definition(cat.embeddings[items].astype(np.float64), cat.head[items].astype(np.float64), labels, 3.0, 0.5)
        errors.append(np.abs(state["residual"] - r).max())
    assert max(errors) < 0.03 and np.median(errors) < 0.005


def test_window_map_keeps_what_leaves_the_window_in_its_anchor(toy):
    rng, cat = toy
    rule = WindowMAP(prior_var=3.0, window=2)
    state = {"residual": np.zeros(8, np.float32), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
    rule.reference(state, cat.embeddings[0], float(cat.head[0]), True, cat, item=0)
    after_first = state["residual"].copy()
    for item in (1, 2):  # item 0 leaves the window
        rule.reference(state, cat.embeddings[item], float(cat.head[item]), False, cat, item=item)
    assert sorted(np.abs(state["window"]).tolist()) == [2, 3]
    # the accept of item 0 still pulls the residual towards it, against a learner that never saw it
    fresh = {"residual": np.zeros(8, np.float32), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
    for item in (1, 2):
        rule.reference(fresh, cat.embeddings[item], float(cat.head[item]), False, cat, item=item)
    x0 = cat.embeddings[0]
    assert x0 @ after_first > 0 and x0 @ state["residual"] > x0 @ fresh["residual"] + 0.1


def test_window_map_takes_an_embedding_outside_the_catalog_without_keeping_it(toy):
    rng, cat = toy
    rule = WindowMAP(prior_var=1.0, window=4)
    state = {"residual": np.zeros(8, np.float32), **{f: np.full(fl.shape, fl.fill, fl.dtype) for f, fl in rule.fields(8).items()}}
    x = unit_rows(rng, 1, 8)[0]
    rule.reference(state, x, 0.0, True, cat, item=-1)
    assert (state["window"] == 0).all() and (state["beta"] == 0).all()
    np.testing.assert_allclose(state["residual"], map_by_definition(x[None].astype(np.float64), np.zeros(1), np.ones(1), 1.0, 1e-12)[0],
                               atol=1e-4)


def test_rules_validate_their_hyperparameters():
    for bad in (lambda: PairwiseSGD(buffer_size=3), lambda: PointwiseSGD(max_norm=float("inf")),
                lambda: PointwiseSGD(lr=0), lambda: DiagonalLaplace(prior_var=0), lambda: IsotropicLaplace(prior_var=-1),
                lambda: DiagonalLaplace(dtype="int8"),
                lambda: WindowMAP(window=0), lambda: WindowMAP(head_var=-1), lambda: WindowMAP(newton_steps=1.5)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="overshoot"):
        PairwiseSGD(lr=10, l2=0.1)


@pytest.mark.parametrize("name, cls", [("pointwise", PointwiseSGD), ("pairwise", PairwiseSGD), ("laplace", DiagonalLaplace),
                                       ("laplace_iso", IsotropicLaplace), ("window", WindowMAP)])
def test_config_defaults_equal_code_defaults(name, cls):
    hydra_utils = pytest.importorskip("hydra.utils")
    cfg = yaml.safe_load((CONFIGS / "rule" / f"{name}.yaml").read_text())
    rule = hydra_utils.instantiate(cfg)
    assert type(rule) is cls and rule == cls() and isinstance(rule, Rule)
    assert set(cfg) - {"_target_"} == set(vars(cls()))
