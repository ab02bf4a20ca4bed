"""Evaluate and promote on a tiny exported log where one head is clearly better than another.

The catalog's queries each have 5 accepted and 5 rejected items (``write_queries``: accepted
items lie along a direction per query), and every simulated user accepts exactly the accepted
ones. The log is served by ``EpsilonSlots`` over a random head's scores, as the service logs
it. Heads: ``good`` scores along each query's direction (its greedy top 3 are accepted items),
``bad`` against it, ``random`` is the champion.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamml import tracking
from streamml.data import load_queries
from streamml.loop.__main__ import main
from streamml.loop.evaluate import evaluate
from streamml.loop.export import SCHEMA, SCHEMA_VERSION
from streamml.loop.promote import NOT_PROMOTED, decide, promote, rollback
from streamml.offline.module import HeadLearner
from streamml.online.policies import EpsilonSlots
from streamml.register import register
from tests.conftest import write_queries

K = 3


def _export(folder, data, n_users=50, slates_per_user=20, seed=0):
    """An exported log (the export's schema and layout): users accept exactly the accepted items."""
    rng = np.random.default_rng(seed)
    policy = EpsilonSlots(n_explore=2)
    rows, t = [], 1_700_000_000.0
    for s in range(slates_per_user):
        for u in range(n_users):
            q = u % len(data.query_ids)
            ids = np.flatnonzero(data.query == q)  # catalog ids are the rows of load_queries
            slate = policy.select(rng.normal(size=len(ids)), K, rng)
            shown = ids[slate.items]
            labels = data.y[shown]
            t += 1.0
            rows.append({"event_id": f"e{s:02d}{u:03d}", "user": f"u{u}", "query": data.query_ids[q], "created": t,
                         "policy": repr(policy), "bucket": "main", "head": "logging", "raw_candidates": False,
                         "items": shown.tolist(), "positions": list(range(K)), "propensities": slate.propensities.tolist(),
                         "rewards": [{"item": int(i), "position": p, "label": int(y), "time": t + 1}
                                     for p, (i, y) in enumerate(zip(shown, labels))],
                         "n_rewards": K, "schema_version": SCHEMA_VERSION, "date": "2023-11-14"})
    part = folder / "date=2023-11-14"
    part.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["date"]), part / "part-000000.parquet")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(log folder, items_dir, tracking URI, {name: run id}) in a private MLflow store."""
    root = tmp_path_factory.mktemp("promote")
    items_dir = write_queries(root / "queries", n_queries=2, n_per_class=5)
    data = load_queries(items_dir, min_per_class=0)
    direction = np.stack([data.X[(data.query == q) & (data.y == 1)].mean(0) - data.X[(data.query == q) & (data.y == 0)].mean(0)
                          for q in range(len(data.query_ids))])
    direction *= 5 / np.linalg.norm(direction, axis=1, keepdims=True)
    weights = {"good": direction, "bad": -direction,
               "random": np.random.default_rng(1).normal(size=direction.shape) * 5 / np.sqrt(direction.shape[1])}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("default", artifact_location=str(root / "artifacts"))
    mlflow.set_experiment("default")
    runs = {}
    for name, w in weights.items():
        with mlflow.start_run() as run:
            tracking.log_model(HeadLearner.from_linear_weights(w), data.query_ids, data.X.shape[1])
        runs[name] = run.info.run_id
    return _export(root / "events", data), items_dir, uri, runs


def _champion(world, name: str) -> mlflow.MlflowClient:
    """A registered model ``name`` whose champion is the random head."""
    _, _, uri, runs = world
    register(runs["random"], name, "champion", tracking_uri=uri)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def test_evaluate_prefers_the_head_that_ranks_accepted_items_first(world, tmp_path):
    log, items_dir, uri, runs = world
    _champion(world, "eval")
    good = evaluate(log, runs["good"], "models:/eval@champion", items_dir=items_dir, tracking_uri=uri, out=tmp_path)
    bad = evaluate(log, f"runs:/{runs['bad']}/model", "models:/eval@champion", items_dir=items_dir,
                   tracking_uri=uri, experiment=None)
    assert good.champion == "models:/eval/1" and good.challenger == f"runs:/{runs['good']}/model"
    assert good.n_slates == 300 and good.n_users == 50 and good.n_skipped == 0  # the latest 30% of 1000 slates
    for r in good.table.itertuples():  # every estimator: good > random champion > bad, the intervals apart
        assert r.challenger_low > r.champion_high
    for r in bad.table.itertuples():
        assert r.challenger_high < r.champion_low
    row = good.row()
    assert row["estimator"] == "dr" and row["challenger"] > 2.5  # nearly every item of its slates is accepted
    assert bad.row()["challenger"] < 0.5 and 0.9 < row["champion"] < 2.1  # random: about half of 3
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["table"][0]["challenger"] == pytest.approx(row["challenger"])
    assert "| dr (decides) |" in (tmp_path / "evaluation.md").read_text()
    assert written["reward_model"] == "fitted" and "DR's reward model: fitted" in (tmp_path / "evaluation.md").read_text()
    run = mlflow.MlflowClient(uri).get_run(good.run_id)  # logged like a training run: the data's fingerprint as tag
    assert run.data.tags["data_fingerprint"] == good.fingerprint and run.data.tags["challenger"] == good.challenger
    assert run.data.metrics["dr.challenger_low"] == pytest.approx(row["challenger_low"])
    assert decide(good)[0] and not decide(bad)[0]


def test_dr_reward_model_is_the_champion_calibrated_on_the_training_slice(world):
    """The "bad" head scores accepted items lowest; fitted on the log, its reward model says so."""
    from streamml.loop.evaluate import _catalog, fit_reward_model
    from streamml.loop.logs import read_slates, split_by_time
    from streamml.serve.model import load_head

    log, items_dir, uri, runs = world
    train, _ = split_by_time(read_slates(log), 0.3)
    head, catalog = load_head(f"runs:/{runs['bad']}/model", uri), _catalog(items_dir)
    model = fit_reward_model(train, head, catalog)
    data = load_queries(items_dir, min_per_class=0)
    for q, (ids, X) in catalog.items():
        scores, accepted = head.score(q, X), data.y[ids] == 1
        p = model.predict(scores, q)
        assert np.corrcoef(p, scores)[0, 1] < -0.9 and p[accepted].mean() > p[~accepted].mean() + 0.3
    with pytest.raises(ValueError, match=r"training slice\): no slate over catalog items .* reward_model=champion"):
        fit_reward_model(train.iloc[:0], head, catalog, source="log (training slice)")
    with pytest.raises(ValueError, match="reward_model must be one of fitted, champion, got 'own'"):
        evaluate(log, runs["good"], "models:/eval@champion", items_dir=items_dir, tracking_uri=uri, reward_model="own")


def test_promote_moves_the_alias_registers_the_run_and_rollback_undoes_it(world):
    log, items_dir, uri, runs = world
    client = _champion(world, "prom")
    decision = promote(log, runs["good"], name="prom", tracking_uri=uri, items_dir=items_dir, experiment=None)
    assert decision.promoted and (decision.version, decision.previous) == ("2", "1")
    assert decision.message.startswith("promoted: prom@champion -> version 2 (was 1, now @previous)")
    assert client.get_model_version_by_alias("prom", "champion").run_id == runs["good"]
    assert str(client.get_model_version_by_alias("prom", "previous").version) == "1"
    assert rollback("prom", tracking_uri=uri) == ("1", "2")
    assert str(client.get_model_version_by_alias("prom", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("prom", "previous").version) == "2"


def test_a_registered_challenger_is_promoted_as_the_version_it_points_at(world):
    log, items_dir, uri, runs = world
    client = _champion(world, "byalias")
    register(runs["good"], "byalias", "candidate", tracking_uri=uri)  # version 2, not yet the champion
    register(runs["bad"], "byalias", "other", tracking_uri=uri)  # version 3: the alias, not the newest, is what counts
    decision = promote(log, "models:/byalias@candidate", name="byalias", tracking_uri=uri, items_dir=items_dir,
                       experiment=None, n_boot=200)
    assert decision.evaluation.challenger == "models:/byalias/2"
    assert decision.promoted and (decision.version, decision.previous) == ("2", "1")
    assert str(client.get_model_version_by_alias("byalias", "champion").version) == "2"
    assert len(client.search_model_versions("name = 'byalias'")) == 3  # no copy made


def test_a_worse_challenger_is_refused_with_both_figures_and_exit_code_3(world, capsys, monkeypatch):
    log, items_dir, uri, runs = world
    client = _champion(world, "refuse")
    decision = promote(log, runs["bad"], name="refuse", tracking_uri=uri, items_dir=items_dir, experiment=None)
    assert not decision.promoted and decision.version == "1"
    r = decision.evaluation.row()
    assert decision.message.startswith("not promoted: the challenger's lower bound does not beat the champion's estimate")
    assert f"(lower 95% bound {r['challenger_low']:.3f}) vs champion {r['champion']:.3f}" in decision.message
    assert str(client.get_model_version_by_alias("refuse", "champion").version) == "1"
    assert len(client.search_model_versions("name = 'refuse'")) == 1  # a refused run is not registered
    # the command line: the table, the one line, exit code 3
    monkeypatch.chdir(log.parent)
    args = [f"log={log}", f"challenger={runs['bad']}", "name=refuse", f"items_dir={items_dir}", f"tracking_uri={uri}",
            "mlflow_experiment=null", "out=null", "n_boot=200"]
    with pytest.raises(SystemExit) as exit_:
        main(["promote", *args])
    assert exit_.value.code == NOT_PROMOTED
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("not promoted: ") and "| dr (decides) |" in "\n".join(out)
    with pytest.raises(SystemExit, match="^error: .*nosuch.*no such alias"):  # an expected error is one line
        main(["promote", *args, "name=nosuch"])
