"""streamml.online.simulate: deterministic under a seed, baselines on the same streams, recovery counting."""

import numpy as np
import pandas as pd
import pytest

from conftest import write_queries
from streamml.online import simulate
from streamml.offline.baselines import RiverOnline, SklearnLR, SklearnRefitOnline
from streamml.data import load_queries
from streamml.online.policies import EpsilonSlots
from streamml.online import PairwiseSGD, ResidualLearner


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = write_queries(tmp_path_factory.mktemp("q"), n_queries=2, n_per_class=10, dim=16)
    return load_queries(folder, embedding_dim=16, min_per_class=1)


def learners(data):
    return {
        "residual": lambda head: ResidualLearner(data.X, data.query, PairwiseSGD(lr=1.0), head_scores=head),
        "river": lambda head: RiverOnline(data.X),
        "sklearn_refit": lambda head: SklearnRefitOnline(data.X),
        "head_only": simulate.HeadOnly,
    }


def test_coldstart_is_deterministic_and_learns(data):
    online = {k: v for k, v in learners(data).items() if k != "head_only"}
    curves1, finals1 = simulate.coldstart(data, online, n_orders=2, seed=0)
    curves2, finals2 = simulate.coldstart(data, online, n_orders=2, seed=0)
    pd.testing.assert_frame_equal(curves1, curves2)
    assert finals1 == finals2
    assert finals1["residual"]["prequential_auc"] > 0.7  # the synthetic preference is learnable
    _, other_seed = simulate.coldstart(data, online, n_orders=2, seed=1)
    assert other_seed["residual"] != finals1["residual"]


def test_users_flip_one_cluster_and_drift_flips_another(data):
    users = simulate.users(data, n_users=2, n_clusters=3, seed=0, drift=True)
    assert len(users) == 2 * 2 * 2
    for u in users:
        population = data.y[u["candidates"]]
        flipped, flipped_after = u["truth"] != population, u["truth_after"] != population
        assert flipped.any() and flipped_after.any() and not (flipped & flipped_after).any()
    halves = {(u["query"], u["half"]): set(u["candidates"]) for u in users}
    assert not halves[(0, 0)] & halves[(0, 1)] and halves[(0, 0)] | halves[(0, 1)] == set(np.flatnonzero(data.query == 0))


def test_head_scores_come_from_the_other_half(data):
    users = simulate.users(data, n_users=1, seed=0)
    scores = simulate.halves_head_scores(data, SklearnLR(), users)
    u = users[0]
    other = np.setdiff1d(np.flatnonzero(data.query == u["query"]), u["candidates"])
    expected = SklearnLR().fit(data.X[other], data.y[other], np.zeros(len(other), int)).score(
        data.X[u["candidates"]], np.zeros(len(u["candidates"]), int))
    np.testing.assert_allclose(scores[u["candidates"]], expected)


def test_personalize_is_deterministic_and_same_streams(data):
    users = simulate.users(data, n_users=2, seed=0, drift=True)
    head = simulate.halves_head_scores(data, SklearnLR(), users)
    run = lambda: simulate.personalize(data, learners(data), EpsilonSlots(n_explore=2), users, head,  # noqa: E731
                                       k=3, n_rounds=6, drift_round=3, seed=0)
    (a, shown_a), (b, shown_b) = run(), run()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(shown_a, shown_b)
    assert len(shown_a) == len(a) * 3 and shown_a.position.between(0, 2).all()
    assert shown_a.propensity.between(0, 1).all() and (shown_a.propensity < 1).any()  # 2 of 3 slots explored
    assert set(a.learner) == {"residual", "river", "sklearn_refit", "head_only"}
    assert (a.groupby("learner").size() == len(users) * 6).all()
    # no adaptation: one AUC per truth (before and after the drift)
    assert (a[a.learner == "head_only"].groupby("user").user_auc.nunique() <= 2).all()


def test_user_auc_at_and_rounds_to_recover_by_hand():
    table = pd.DataFrame({
        "learner": ["a"] * 4 + ["b"] * 4, "user": ["u"] * 8, "round": [1, 2, 3, 4] * 2,
        "events": [5, 10, 15, 20] * 2, "user_auc": [0.6, 0.8, 0.5, 0.79, 0.6, 0.7, 0.4, 0.5],
    })
    assert simulate.user_auc_at(table, 10).to_dict() == {"a": 0.8, "b": 0.7}
    # drift after round 2: a is back within 0.02 of 0.8 at round 4 (2 rounds); b never (censored: 2 + 1)
    assert simulate.rounds_to_recover(table, drift_round=2).to_dict() == {"a": 2.0, "b": 3.0}


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, key, overrides",
    [
        ("online_coldstart", "prequential_auc", ["scenario.n_orders=1"]),
        ("online_personalize", "user_auc_at_10", ["scenario.n_users=1"]),
        ("online_drift", "rounds_to_recover", ["scenario.n_users=1", "scenario.n_rounds=4", "scenario.drift_round=2"]),
    ],
)
def test_online_experiments_log_their_metric_curves_and_plot(mlflow_uri, experiment, key, overrides):
    import mlflow

    from conftest import REPO, compose_cfg
    from streamml.train import train

    cfg = compose_cfg([f"+experiment={experiment}", f"data.dir={REPO / 'data' / 'queries'}", *overrides])
    metrics = train(cfg)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    baselines = ["river", "sklearn_refit"] + ([] if experiment == "online_coldstart" else ["head_only"])
    for name in [key] + [f"{key}.{b}" for b in baselines]:
        assert np.isfinite(logged[name]) and logged[name] == pytest.approx(metrics[name])
    client = mlflow.MlflowClient(mlflow_uri)
    curve = "curve.prequential_auc.residual" if experiment == "online_coldstart" else "curve.user_auc.residual"
    assert len(client.get_metric_history(runs[0].info.run_id, curve)) > 1
    assert "plots/learning_curves.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")}
