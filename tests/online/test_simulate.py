"""streamml.online.simulate and scenarios: probe items never shown, identical streams for every
learner, disjoint tune/test streams, metrics at the checkpoints, determinism under a seed."""

import numpy as np
import pandas as pd
import pytest

from conftest import write_queries
from streamml.data import load_queries
from streamml.offline.baselines import SklearnLR
from streamml.online import PointwiseSGD, ResidualLearner, scenarios, simulate
from streamml.online.baselines import HeadOnly, RiverOnline, SklearnRefitOnline
from streamml.online.policies import EpsilonSlots, Greedy, PlackettLuce


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = write_queries(tmp_path_factory.mktemp("q"), n_queries=2, n_per_class=14, dim=16)
    return load_queries(folder, embedding_dim=16, min_per_class=1)


@pytest.fixture(scope="module")
def real(data):
    return scenarios.real_users(data, SklearnLR(), "test", seed=0, users={"flip_cluster": 2, "none": 1})


@pytest.fixture(scope="module")
def large(data):
    return scenarios.large_catalog(data, SklearnLR(), "test", seed=0, users={"flip_cluster": 1, "shift": 1, "none": 1},
                                   n_candidates=(60, 120), n_population=100, n_components=2)


def learners(baselines_from_scratch=False):
    """The residual and the head; river and sklearn refit too when asked (they are slow)."""
    out = {
        "residual": lambda items, q, head: ResidualLearner(items, q, rule=PointwiseSGD(lr=1.0), head_scores=head),
        "head_only": HeadOnly,
    }
    if baselines_from_scratch:
        out.update(river=RiverOnline, sklearn_refit=SklearnRefitOnline)
    return out


def test_honest_users_agree_shift_or_flip_answer_noisily_and_a_population_answers_part_of_the_items(data):
    kinds = {"none": 2, "shift": 1, "flip_cluster": 1}
    clean = scenarios.real_users(data, SklearnLR(), "tune", seed=0, users=kinds, n_population=6, population_answers=0.5)
    noisy = scenarios.real_users(data, SklearnLR(), "tune", seed=0, users=kinds, label_noise=0.3)
    assert {u.model for u in clean.users} == set(kinds)
    for u in clean.users:  # without noise a user who agrees answers as the population does
        if u.model == "none":
            assert (u.pool_truth == data.y[u.pool]).all() and (u.probe_truth == data.y[u.probe]).all()
    flipped = [np.mean(np.r_[u.pool_truth, u.probe_truth] != data.y[np.r_[u.pool, u.probe]])
               for u in noisy.users if u.model == "none"]
    assert 0.15 < np.mean(flipped) < 0.45  # about label_noise of the answers flipped
    pop = clean.population
    assert set(pop.columns) >= {"user", "query", "item", "label", "time"}
    assert pop.user.nunique() == 6 * 2 * len(data.query_ids)  # per query half
    assert not set(pop.user) & {u.name for u in clean.users}  # other people than the reported users
    assert 0.3 < len(pop) / (6 * len(data.y)) < 0.7  # each answered about half of their half's items
    assert (clean.item_query[pop.item] == pop["query"]).all()
    assert noisy.population is None
    with pytest.raises(ValueError, match="label_noise"):
        scenarios.real_users(data, SklearnLR(), "tune", seed=0, users=kinds, label_noise=0.6)


def test_split_probe_is_stratified_and_disjoint():
    truth = np.array([0] * 10 + [1] * 6)
    pool, probe = scenarios.split_probe(truth, 0.5, np.random.default_rng(0))
    assert not set(pool) & set(probe) and len(pool) + len(probe) == 16
    assert truth[probe].sum() == 3 and (truth[probe] == 0).sum() == 5
    with pytest.raises(ValueError, match="at least 2 candidates of each class"):
        scenarios.split_probe(np.array([0, 0, 0, 1]), 0.5, np.random.default_rng(0))


def test_worlds_keep_pool_and_probe_apart_and_head_off_the_candidates(data, real, large):
    for world in (real, large):
        for u in world.users:
            assert not set(u.pool) & set(u.probe)
            assert set(u.probe_truth) == {0, 1}
            assert (world.item_query[np.concatenate([u.pool, u.probe])] == u.query).all()
    assert {u.model for u in real.users} == {"flip_cluster", "none"}
    assert {u.model for u in large.users} == {"flip_cluster", "shift", "none"}
    assert all(60 <= len(u.pool) + len(u.probe) <= 120 for u in large.users)
    # the population labels of a 'none' user are the real labels; the head never saw them
    none = next(u for u in real.users if u.model == "none")
    np.testing.assert_array_equal(none.probe_truth, data.y[none.probe])
    cand = np.concatenate([none.pool, none.probe])
    other = np.setdiff1d(np.flatnonzero(data.query == none.query), cand)
    zeros = np.zeros(len(other), int)
    expected = SklearnLR().fit(data.X[other], data.y[other], zeros).score_rows(data.X[cand], np.zeros(len(cand), int))
    np.testing.assert_allclose(real.head_scores[cand], expected)


@pytest.mark.parametrize("policy", [Greedy(), EpsilonSlots(n_explore=2), PlackettLuce()], ids=repr)
def test_probe_items_are_never_shown(real, large, policy):
    everyone = isinstance(policy, EpsilonSlots)  # river and sklearn refit once: they are slow
    for world in (real, large):
        _, shown = simulate.interact(world, learners(everyone), policy, k=4, n_rounds=5, seed=0, progress=False)
        assert len(shown) and set(shown.learner) == set(learners(everyone))
        users = {u.name: u for u in world.users}
        for (learner, user), part in shown.groupby(["learner", "user"]):
            assert not set(part["item"]) & set(users[user].probe)
            assert set(part["item"]) <= set(users[user].pool)
            assert part["item"].is_unique


def test_every_learner_sees_identical_streams(large):
    make = learners()["residual"]
    twins = {"a": make, "b": make, "head_only": HeadOnly}
    rounds, shown = simulate.interact(large, twins, EpsilonSlots(n_explore=2), k=5, n_rounds=4, seed=0, progress=False)
    a, b = (rounds[rounds.learner == n].drop(columns="learner").reset_index(drop=True) for n in ("a", "b"))
    pd.testing.assert_frame_equal(a, b)
    sa, sb = (shown[shown.learner == n].drop(columns="learner").reset_index(drop=True) for n in ("a", "b"))
    pd.testing.assert_frame_equal(sa, sb)
    # before any feedback the residual ranks exactly as the head
    before = rounds[rounds["round"] == 0].pivot(index="user", columns="learner", values="probe_auc")
    np.testing.assert_allclose(before["a"], before["head_only"], atol=1e-6)


def test_tune_and_test_streams_are_disjoint(data):
    worlds = {s: scenarios.large_catalog(data, SklearnLR(), s, seed=0, users={"none": 1}, n_candidates=(40, 60),
                                         n_population=50, n_components=2) for s in ("tune", "test")}
    tune, test = worlds["tune"].items, worlds["test"].items
    assert not (tune[:, None, :] == test[None, :, :]).all(-1).any()  # no generated item in both
    real = {s: scenarios.real_users(data, SklearnLR(), s, seed=0, users={"flip_cluster": 1}) for s in ("tune", "test")}
    pools = [{tuple(u.pool) for u in real[s].users} for s in ("tune", "test")]
    assert not pools[0] & pools[1]
    cold = [scenarios.coldstart_streams(data, s, seed=0, n_orders=2) for s in ("tune", "test")]
    assert all(not np.array_equal(t[2], s[2]) for t, s in zip(*cold))
    with pytest.raises(ValueError, match="streams must be one of"):
        scenarios.stream_seed("train", 0)


def test_interact_is_deterministic_under_a_seed(real):
    run = lambda seed: simulate.interact(real, learners(), EpsilonSlots(n_explore=2), k=4,  # noqa: E731
                                         n_rounds=3, seed=seed, progress=False)
    (a, shown_a), (b, shown_b), (_, shown_c) = run(0), run(0), run(1)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(shown_a, shown_b)
    assert not shown_a["item"].equals(shown_c["item"])
    assert shown_a.propensity.between(0, 1).all() and (shown_a.propensity < 1).any()


def test_metrics_at_the_checkpoints_the_pools_allow(large, real):
    rounds, _ = simulate.interact(large, learners(), Greedy(), k=5, n_rounds=8, seed=0, progress=False)
    metrics = simulate.summarize(rounds, k=5)
    for name in learners():
        for c in (5, 10, 20, 40):
            value = metrics[name][f"probe_auc_at_{c}"]
            expected = rounds[(rounds.learner == name) & (rounds.events == c)].probe_auc.mean()
            assert value == pytest.approx(expected)
        assert 0 < metrics[name]["cumulative_accepts_per_slate"] <= 5
    assert metrics["head_only"]["probe_lift_at_40"] == 0.0
    # the real pools are small: only the checkpoints every user reaches
    rounds, _ = simulate.interact(real, learners(), Greedy(), k=5, n_rounds=8, seed=0, progress=False)
    assert simulate.checkpoints_reached(rounds) == [c for c in (5, 10, 20, 40) if c <= rounds.events.max()]
    assert rounds.groupby(["learner", "user"]).events.max().min() < 20


def test_summarize_by_hand():
    rounds = pd.DataFrame({
        "learner": ["a"] * 3 + ["head_only"] * 3, "user": ["u"] * 6, "user_model": ["none"] * 6,
        "round": [0, 1, 2] * 2, "events": [0, 5, 10] * 2, "accepts": [0, 3, 1, 0, 2, 2],
        "cumulative_accepts": [0, 3, 4, 0, 2, 4], "probe_auc": [0.6, 0.7, 0.9, 0.6, 0.6, 0.6],
    })
    out = simulate.summarize(rounds, k=5)
    assert out["a"]["probe_auc_at_5"] == pytest.approx(0.7) and out["a"]["probe_auc_at_10"] == pytest.approx(0.9)
    assert out["a"]["probe_lift_at_10"] == pytest.approx(0.3) and "probe_auc_at_20" not in out["a"]
    assert out["a"]["probe_auc_mean"] == pytest.approx(0.8) and out["a"]["cumulative_accepts_per_slate"] == 2.0


def test_gaps_to_ours_are_paired_on_the_user():
    """Users listed in a different order per learner: the gap still pairs each user with itself."""
    rows = []
    for learner, user_aucs, accepts in (("ours", {"u": 0.9, "v": 0.6}, {"u": 4, "v": 2}),
                                        ("other", {"v": 0.5, "u": 0.6}, {"v": 1, "u": 4})):
        for user, auc in user_aucs.items():
            rows += [{"learner": learner, "user": user, "user_model": "none", "round": r, "events": 5 * r,
                      "accepts": accepts[user] if r else 0, "probe_auc": auc if r else 0.5} for r in (0, 1)]
    out = simulate.summarize(pd.DataFrame(rows), k=5, ours="ours")
    assert out["other"]["probe_gap_at_5"] == pytest.approx(0.2)  # (0.3 + 0.1) / 2
    assert out["other"]["probe_gap_at_5_std"] == pytest.approx(0.1)
    assert out["other"]["accepts_gap"] == pytest.approx(0.5) and out["other"]["users"] == 2
    assert out["ours"]["probe_gap_at_5"] == 0.0 and "probe_lift_at_5" not in out["ours"]  # no head_only here


def test_run_names_carry_the_rule_settings_features_and_a_policy_other_than_the_defaults():
    from conftest import compose_cfg

    name = simulate._run_name(compose_cfg(["+experiment=online_personalize"]))
    assert name == "personalize-test-WindowMAP-prior_var300.0-window8-newton_steps1-head_var1.0-head_interaction1.0"
    thompson = compose_cfg(["+experiment=online_personalize", "rule=laplace", "rule.prior_var=10.0", "~rule.head_var",
                            "~rule.newton_steps", "explore=thompson", "scenario.streams=tune", "online.features=standardized"])
    assert simulate._run_name(thompson) == "personalize-tune-DiagonalLaplace-prior_var10.0-head_interaction1.0-Thompson"
    assert "head_interaction" not in simulate._run_name(compose_cfg(["+experiment=online_personalize", "online.head_interaction=0"]))
    assert simulate._run_name(compose_cfg(["+experiment=online_coldstart"])).endswith("window8-newton_steps1-centered")
    assert simulate._run_name(compose_cfg(["+experiment=online_large_catalog"])).endswith("head_var1.0-head_interaction4.0")
    assert simulate._run_name(compose_cfg(["+experiment=mixed_coldstart"])) == (
        "coldstart-test-MixedLearner-k48-factorsals-trustTrue-gateFalse-prior_var5.0-covariancediagonal-bias_var0.0")
    assert simulate._run_name(compose_cfg(["+experiment=mixed_large_catalog"])).endswith("gateTrue-prior_var3.0")


def test_test_scale_multiplies_the_test_streams_only():
    from omegaconf import OmegaConf

    assert simulate._scale(OmegaConf.create({"streams": "test", "test_scale": 5})) == 5
    assert simulate._scale(OmegaConf.create({"streams": "tune", "test_scale": 5})) == 1
    for bad in (0, 2.5, None):
        with pytest.raises(ValueError, match=f"scenario.test_scale must be an integer >= 1, got {bad}"):
            simulate._scale(OmegaConf.create({"streams": "test", "test_scale": bad}))
    with pytest.raises(ValueError, match="got None"):
        simulate._scale(OmegaConf.create({"streams": "test"}))


def test_coldstart_is_deterministic_and_learns(data):
    online = {"residual": learners()["residual"], "river": RiverOnline}
    streams = scenarios.coldstart_streams(data, "test", seed=0, n_orders=1)
    run = lambda: simulate.coldstart(streams, online, data.X, data.query, data.y, progress=False)  # noqa: E731
    (curves1, finals1), (curves2, finals2) = run(), run()
    pd.testing.assert_frame_equal(curves1, curves2)
    assert finals1 == finals2
    assert finals1["residual"]["prequential_auc"] > 0.7  # the synthetic preference is learnable
    gap = finals1["river"]["prequential_auc_gap"]
    assert finals1["residual"]["prequential_auc_gap"] == 0.0 and finals1["river"]["streams"] == len(streams)
    assert gap == pytest.approx(finals1["residual"]["prequential_auc"] - finals1["river"]["prequential_auc"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, overrides",
    [
        ("online_coldstart", ["scenario.n_orders=1", "scenario.test_scale=2"]),
        ("online_personalize", ["scenario.users={none: 0, flip_cluster: 1, shift: 0}", "scenario.n_rounds=2",
                                "scenario.test_scale=2"]),
        ("online_large_catalog", ["scenario.users={none: 0, flip_cluster: 0, shift: 1}", "scenario.n_candidates=[200,300]",
                                  "scenario.n_population=100", "scenario.n_rounds=2", "scenario.test_scale=1"]),
        ("mixed_personalize", ["scenario.users={none: 1, flip_cluster: 0, shift: 1}", "scenario.n_rounds=2",
                               "scenario.test_scale=1", "scenario.n_population=4"]),
    ],
)
def test_online_experiments_log_their_metrics_curves_and_plot(mlflow_uri, experiment, overrides):
    import mlflow

    from conftest import REPO, compose_cfg
    from streamml.train import train

    cfg = compose_cfg([f"+experiment={experiment}", f"data.dir={REPO / 'data' / 'queries'}", "trainer.max_epochs=5",
                       *overrides])
    metrics = train(cfg)
    key = cfg.objective
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    baselines = ["river", "sklearn_refit"] + ([] if experiment == "online_coldstart" else ["head_only"])
    assert metrics[key] == pytest.approx(logged[key])  # ours under the bare key, whichever learner it is
    for name in [key] + [f"{key}.{b}" for b in baselines]:
        assert np.isfinite(logged[name]) and logged[name] == pytest.approx(metrics[name])
    if experiment != "online_coldstart":
        assert {"probe_auc_at_5", "probe_auc_at_10", "cumulative_accepts_per_slate"} <= set(logged)
    # test streams: test_scale times the tuning streams' users (per query half) or orders (per query)
    n_queries = len(load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class).query_ids)
    sc = cfg.scenario
    if experiment == "online_coldstart":
        assert logged["streams"] == n_queries * sc.n_orders * 2
    else:
        halves = 2 if experiment.endswith("personalize") else 1
        assert logged["users"] == n_queries * halves * sum(sc.users.values()) * sc.test_scale
    gap = "prequential_auc_gap" if experiment == "online_coldstart" else "probe_gap_at_5"
    assert logged[gap] == 0 and f"{gap}.river" in logged and f"{gap}_std.river" in logged
    params = runs[0].data.params
    assert "scenario.kind" in params and not any(p.startswith("cv.") for p in params)
    client = mlflow.MlflowClient(mlflow_uri)
    ours = "mixed" if experiment.startswith("mixed") else "residual"
    curve = f"curve.prequential_auc.{ours}" if experiment == "online_coldstart" else f"curve.probe_auc.{ours}"
    assert len(client.get_metric_history(runs[0].info.run_id, curve)) > 1
    assert "plots/learning_curves.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")}


def test_a_large_catalogs_population_answers_items_of_its_own_and_moves_no_user(data):
    kinds = {"none": 1, "flip_cluster": 1, "shift": 1}
    args = dict(users=kinds, n_candidates=(60, 120), n_population=100, n_components=2)
    alone = scenarios.large_catalog(data, SklearnLR(), "tune", seed=0, **args)
    world = scenarios.large_catalog(data, SklearnLR(), "tune", seed=0, population_users=4, population_answers=30, **args)
    assert alone.population is None
    for a, b in zip(alone.users, world.users, strict=True):  # the same users, items and head scores
        np.testing.assert_array_equal(a.pool, b.pool), np.testing.assert_array_equal(a.probe_truth, b.probe_truth)
    np.testing.assert_array_equal(alone.items, world.items[: len(alone.items)])
    np.testing.assert_allclose(alone.head_scores, world.head_scores[: len(alone.items)], rtol=1e-5)  # float32 batches
    pop = world.population
    assert pop.user.nunique() == 4 * len(data.query_ids) and (pop.groupby("user").size() == 30).all()
    assert pop.item.min() == len(alone.items) and pop.item.is_unique  # after the users' items, each answered once
    assert (world.item_query[pop.item] == pop["query"]).all() and 0 < pop.label.mean() < 1
