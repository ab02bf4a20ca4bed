"""Retraining from the exported log: the IPS label rule by hand, bad logs named, and a run end to end."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg, write_queries
from streamml.loop.export import SCHEMA_VERSION, _write_chunk
from streamml.loop.logs import fingerprint, read_slates, reward_rows, split_by_time
from streamml.loop.retrain import log_labels, retrain
from streamml.loop.retrain import write_queries as write_log_queries
from streamml.stores.events import read_catalog


def slate(event_id, user, query, items, props, rewards, created):
    """One export row (the schema of streamml.loop.export)."""
    pos = {i: p for p, i in enumerate(items)}
    return {"event_id": event_id, "user": user, "query": query, "created": created, "policy": "uniform", "bucket": "a",
            "head": "h0", "raw_candidates": False, "items": list(items), "positions": list(range(len(items))),
            "propensities": list(props), "n_rewards": len(rewards), "schema_version": SCHEMA_VERSION,
            "rewards": [{"item": i, "position": pos[i], "label": y, "time": created + 1.0} for i, y in rewards],
            "date": "2026-12-05"}


def rewards_of(rows):
    return reward_rows(pd.DataFrame(rows))


@pytest.fixture
def catalog(tmp_path):
    return read_catalog(write_queries(tmp_path / "catalog", n_queries=3, n_per_class=8, seed=1))


def test_ips_rates_count_rarely_shown_answers_for_the_users_not_shown(catalog):
    q = catalog.queries[0]
    a, b = (int(i) for i in catalog.of(q)[:2])
    # item a: accepted 4 times on slots it fills for sure (propensity 1), rejected once on a slot of propensity 0.25
    rows = [slate(f"e{n}", "u", q, [a], [1.0], [(a, 1)], n) for n in range(4)]
    rows += [slate("e4", "v", q, [a], [0.25], [(a, 0)], 4)]
    rows += [slate(f"f{n}", "w", q, [b], [1.0], [(b, n % 2)], 10 + n) for n in range(4)]  # item b: rate 0.5 either way
    ips = log_labels(rewards_of(rows), catalog, "ips").set_index("item")
    naive = log_labels(rewards_of(rows), catalog, "naive").set_index("item")
    assert naive.rate[a] == pytest.approx(0.8) and ips.rate[a] == pytest.approx(4 / (4 + 4))
    assert ips.rate[b] == naive.rate[b] == pytest.approx(0.5)
    assert ips.n[a] == 5 and ips.n[b] == 4
    # the median rule of the replay: both at the median (0.5) are accepted under ips; naive puts a above b
    assert ips.label.tolist() == [1, 1] and naive.label[a] == 1 and naive.label[b] == 0
    clipped = log_labels(rewards_of(rows), catalog, "ips", max_weight=2).set_index("item")
    assert clipped.rate[a] == pytest.approx(4 / (4 + 2))
    only_explore = log_labels(rewards_of(rows), catalog, "exploration", min_rewards=1)
    assert only_explore["item"].tolist() == [a] and only_explore.rate.tolist() == [0.0]


def test_bad_logs_are_named(catalog):
    q, other = catalog.queries[0], catalog.queries[-1]
    item_of_other = int(catalog.of(other)[0])
    with pytest.raises(ValueError, match=r"event 'e1': item 999 of query '.*' is not that query's item in the catalog"):
        log_labels(rewards_of([slate("e1", "u", q, [999], [1.0], [(999, 1)], 0)]), catalog)
    with pytest.raises(ValueError, match=rf"event 'e2': item {item_of_other} of query '{q}' is not that query's item"):
        log_labels(rewards_of([slate("e2", "u", q, [item_of_other], [1.0], [(item_of_other, 1)], 0)]), catalog)
    unlabelled = slate("e3", "u", q, [0], [1.0], [(0, None)], 0)
    with pytest.raises(ValueError, match=r"event 'e3': the reward of item 0 has no label"):
        reward_rows(pd.DataFrame([unlabelled]))
    with pytest.raises(ValueError, match="rule must be one of"):
        log_labels(rewards_of([]), catalog, "nope")


def test_split_by_time_holds_out_the_latest_slates():
    df = pd.DataFrame({"created": [3.0, 1.0, 2.0, 4.0], "event_id": ["c", "a", "b", "d"]})
    train, held = split_by_time(df, 0.25)
    assert train.event_id.tolist() == ["a", "b", "c"] and held.event_id.tolist() == ["d"]
    with pytest.raises(ValueError, match="holdout"):
        split_by_time(df, 1.0)


def simulated_log(catalog, folder, n_slates=600, seed=0):
    """Slates of 3 items drawn uniformly from a query's 16 (P(item at a position) = 1/16); an answered
    item is accepted with probability 0.85 if its query file says accepted, else 0.15."""
    rng = np.random.default_rng(seed)
    truth = {}
    for q in catalog.queries:
        truth.update({int(i): n < 8 for n, i in enumerate(catalog.of(q))})
    rows = []
    for n in range(n_slates):
        q = catalog.query_ids[n % len(catalog.query_ids)]
        items = rng.choice(catalog.of(q), 3, replace=False).tolist()
        answered = [(i, int(rng.random() < (0.85 if truth[i] else 0.15))) for i in items if rng.random() < 0.7]
        rows.append(slate(f"e{n:04d}", f"u{n % 37}", q, items, [1 / 16] * 3, answered, 1_700_000_000.0 + n))
    _write_chunk(folder, rows, 0)
    return truth


def test_retrain_trains_a_head_on_the_log_and_tags_its_run(catalog, tmp_path, mlflow_uri):
    exported = tmp_path / "export"
    truth = simulated_log(catalog, exported)
    cfg = compose_cfg([f"retrain.log={exported}", f"retrain.catalog={tmp_path / 'catalog'}",
                       f"retrain.out={tmp_path / 'log_queries'}", "retrain.holdout=0.25"], config="loop/retrain")
    result = retrain(cfg)
    run = mlflow.MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert run.data.tags["log_fingerprint"] == fingerprint(exported)
    assert run.data.tags["data_source"] == "export" and run.data.tags["retrain_rule"] == "ips"
    # the labels written are the log's, and the log recovers the truth for most items
    written = {row["text"]: row["label"] == "accepted" for f in (tmp_path / "log_queries").glob("*.json")
               for row in json.loads(f.read_text())}
    agree = np.mean([written[catalog.texts[i]] == t for i, t in truth.items() if catalog.texts[i] in written])
    assert len(written) >= 40 and agree >= 0.9, (len(written), agree)
    # the head it logged ranks the truly accepted items of every query first (AUC over the whole catalog)
    from sklearn.metrics import roc_auc_score

    model = mlflow.pyfunc.load_model(result["model_uri"])
    for q in catalog.query_ids:
        rows = catalog.of(q)
        scores = np.asarray(model.predict(pd.DataFrame({"query_id": [q] * len(rows), "embedding": catalog.X[rows].tolist()})))
        assert roc_auc_score([truth[int(i)] for i in rows], scores.ravel()) > 0.9, q
    # only slates before the held-out quarter were read
    train_part, held = split_by_time(read_slates(exported), 0.25)
    labels = log_labels(reward_rows(train_part), catalog)
    assert sorted(written) == sorted(catalog.texts[i] for i in labels["item"])
    assert len(held) == 150
    artifacts = {a.path for a in mlflow.MlflowClient(mlflow_uri).list_artifacts(result["run_id"], "log_queries")}
    assert {f"log_queries/{q}.json" for q in catalog.query_ids} == artifacts


def test_a_query_with_one_label_is_left_out(catalog, tmp_path):
    labels = pd.DataFrame({"item": [0, 1, 16, 17], "query": [catalog.queries[0]] * 2 + [catalog.queries[16]] * 2,
                           "n": 2, "rate": [0.5, 0.5, 0.2, 0.9], "label": [1, 1, 0, 1]})
    assert write_log_queries(labels, catalog, tmp_path / "q") == [catalog.queries[16]]
    with pytest.raises(ValueError, match="nothing to train on"):
        write_log_queries(labels.iloc[:2], catalog, tmp_path / "q")
