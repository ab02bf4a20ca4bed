"""The replay of logged feedback: readers, splits, keys, the protocol and its statistics.

A small synthetic log in the documented format stands in for real logs on a plain clone;
the MovieLens checks run where ``../shared`` holds it and skip, saying so, elsewhere.
"""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from streamml.online import replay as R
from streamml.online.baselines import HeadOnly

MOVIELENS = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens-100k"


def synthetic_log(n_users=12, n_items=10, seed=0) -> pd.DataFrame:
    """Two queries; each user answers every item of both, in bursts that share a timestamp."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for q in ("cats", "dogs"):
            for j, i in enumerate(rng.permutation(n_items)):
                rows.append({"user": f"u{u}", "query": q, "item": f"{q}-{i}", "text": f"a sentence about {q} number {i}",
                             "label": int(rng.random() < (0.2 + 0.06 * i)), "time": 1000 + j // 3})
    return pd.DataFrame(rows)


def fake_embed(texts):
    """A deterministic 8-d embedding of each text (no model needed)."""
    seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
    return np.stack([np.random.default_rng(s).standard_normal(8) for s in seeds]).astype(np.float32)


@pytest.fixture
def log_csv(tmp_path):
    path = tmp_path / "events.csv"
    synthetic_log().to_csv(path, index=False)
    return path


def test_read_log_reads_csv_and_parquet_alike(log_csv, tmp_path):
    csv = R.read_log(log_csv)
    synthetic_log().to_parquet(tmp_path / "events.parquet")
    parquet = R.read_log(tmp_path / "events.parquet")
    assert set(R.LOG_COLUMNS) <= set(csv.columns)
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)
    assert set(csv.label) == {0, 1}


@pytest.mark.parametrize("column,value,message", [
    ("label", "maybe", r"row 3: label must be 1/0 or accepted/rejected, got 'maybe'"),
    ("time", "yesterday", r"row 3: time must be a number or an ISO timestamp, got 'yesterday'"),
    ("user", "", r"row 3: user is empty"),
])
def test_a_bad_row_is_named_with_its_file_and_problem(tmp_path, column, value, message):
    frame = synthetic_log()
    frame[column] = frame[column].astype(object)
    frame.loc[3, column] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(R.LogError, match=str(path).replace(".", r"\.") + ", " + message):
        R.read_log(path)


def test_missing_columns_and_files_are_named(tmp_path):
    path = tmp_path / "events.csv"
    synthetic_log().drop(columns=["time"]).to_csv(path, index=False)
    with pytest.raises(R.LogError, match=r"missing column\(s\) \['time'\]"):
        R.read_log(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        R.read_log(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="u.data"):
        R.read_movielens(tmp_path)


def test_labels_and_iso_times_are_accepted_in_words():
    frame = synthetic_log().head(4).assign(label=["accepted", "rejected", 1, 0],
                                           time=["2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z", "2024-01-02", "2024-01-03"])
    out = R.check_log(frame)
    assert out.label.tolist() == [1, 0, 1, 0]
    assert out.time.tolist()[:2] == [1704067200.0, 1704067201.0]


def test_users_split_into_three_disjoint_reproducible_parts():
    users = [f"u{i}" for i in range(100)]
    split = R.split_users(users, seed=3)
    assert [len(split[k]) for k in ("population", "tuning", "test")] == [40, 10, 50]
    assert set().union(*split.values()) == set(users)
    assert not (split["population"] & split["test"]) and not (split["tuning"] & split["test"])
    assert R.split_users(reversed(users), seed=3) == split  # the order users arrive in does not matter
    assert R.split_users(users, seed=4) != split
    with pytest.raises(ValueError, match="leave test users"):
        R.split_users(users, population=0.7, tuning=0.3)


def test_catalog_embeds_each_distinct_text_once_and_caches(tmp_path):
    events = synthetic_log()
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return fake_embed(texts)

    cat = R.build_catalog(events, embed, cache_dir=tmp_path)
    assert len(cat.items) == 20 and cat.X.shape == (20, 8) and calls == [20]
    again = R.build_catalog(events, embed, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.X, cat.X)
    assert calls == [20]  # read from the cache
    assert cat.index[("dogs", "dogs-3")] == list(zip(cat.items["query"], cat.items["item"])).index(("dogs", "dogs-3"))


def test_head_labels_accept_items_at_or_above_their_querys_median_rate(tmp_path):
    events = pd.DataFrame({"user": list("abcabc"), "query": ["q"] * 6, "item": ["x", "x", "y", "y", "z", "z"],
                           "text": ["x", "x", "y", "y", "z", "z"], "label": [1, 1, 1, 0, 0, 0], "time": range(6)})
    cat = R.build_catalog(events, fake_embed, cache_dir=tmp_path)
    ids, y = R.head_labels(events, cat)
    rate = dict(zip(cat.items.item[ids], y))
    assert rate == {"x": 1, "y": 1, "z": 0}  # rates 1, 0.5, 0: the median 0.5 is accepted


def test_keys_are_in_time_order_with_ties_broken_by_item_and_the_last_third_probed(tmp_path):
    events = synthetic_log()
    cat = R.build_catalog(events, fake_embed, cache_dir=tmp_path)
    keys = R.make_keys(events, cat, {"u1", "u2"}, min_events=10)
    assert [(k.user, k.query) for k in keys] == [(u, q) for u in ("u1", "u2") for q in ("cats", "dogs")
                                                 if len(set(events[(events.user == u) & (events["query"] == q)]
                                                            .sort_values(["time", "item"]).label.tail(4))) == 2]
    key = keys[0]
    rows = events[(events.user == key.user) & (events["query"] == key.query)].sort_values(["time", "item"], kind="stable")
    order = [cat.index[(key.query, i)] for i in rows["item"]]
    assert len(key.probe) == 4 and len(key.stream) == 6  # ceil(10 / 3) probed
    assert key.stream.tolist() + key.probe.tolist() == order
    assert R.make_keys(events, cat, {"u1"}, min_events=11) == []


def test_shuffled_labels_keep_each_keys_labels_and_items(tmp_path):
    events = synthetic_log()
    cat = R.build_catalog(events, fake_embed, cache_dir=tmp_path)
    keys = R.make_keys(events, cat, {f"u{i}" for i in range(12)}, min_events=10)
    by_key = {(k.user, k.query): k for k in keys}
    shuffled = R.shuffle_labels(keys)
    assert 0 < len(shuffled) <= len(keys)  # keys left with one probe label are dropped
    for b in shuffled:
        a = by_key[(b.user, b.query)]
        assert sorted(np.r_[a.stream_labels, a.probe_labels]) == sorted(np.r_[b.stream_labels, b.probe_labels])
        np.testing.assert_array_equal(a.probe, b.probe)


def test_clustered_se_by_hand():
    values, clusters = np.array([1.0, 3.0, 2.0, 6.0]), np.array(["a", "a", "b", "b"])
    # residuals about the mean 3: (-2, 0) and (-1, 3); cluster sums -2 and 2; G = 2
    assert R.clustered_se(values, clusters) == pytest.approx(np.sqrt(2 / 1 * (4 + 4)) / 4)
    # one observation per cluster: the usual standard error
    v = np.array([0.2, 0.5, 0.9, 0.4])
    assert R.clustered_se(v, np.arange(4)) == pytest.approx(v.std(ddof=1) / 2)


def test_replay_scores_the_probe_after_each_checkpoint(tmp_path):
    events = synthetic_log(n_users=6, n_items=15)
    cat = R.build_catalog(events, fake_embed, cache_dir=tmp_path)
    keys = R.make_keys(events, cat, {f"u{i}" for i in range(6)}, min_events=15)
    head = np.arange(len(cat.items), dtype=float)
    rounds = R.replay({"head_only": HeadOnly(cat.X, cat.item_query, head)}, keys, checkpoints=(5, 10, 40), progress=False)
    assert sorted(set(rounds.events)) == [0, 5, 10]  # 40 is beyond every stream (10 events)
    first = rounds[(rounds.user == keys[0].user) & (rounds["query"] == keys[0].query)]
    assert first.probe_auc.tolist() == [roc_auc_score(keys[0].probe_labels, head[keys[0].probe])] * 3
    stream_auc = pd.Series({(k.user, k.query): float(i) for i, k in enumerate(keys)})
    summary = R.summarize(rounds, stream_auc)
    assert (summary.lift == 0).all()
    at5 = summary[summary.events == 5].set_index("group")
    assert at5.loc["all", "n"] == len(keys) == at5.loc["head_good", "n"] + at5.loc["head_bad", "n"]


@pytest.mark.skipif(not (MOVIELENS / "u.data").exists(), reason=f"MovieLens 100k not found: {MOVIELENS} (GroupLens; not shipped)")
def test_movielens_reads_as_the_issue_describes():
    events = R.read_movielens(MOVIELENS)
    assert events["query"].nunique() == 8 and events.user.nunique() == 943
    assert events.groupby("query").size().idxmax() == "Drama"
    assert set(events.label) == {0, 1} and (events.label == (events.rating >= 4)).all()
    assert len(events.drop_duplicates(["user", "movie"])) <= 100_000


@pytest.mark.slow
def test_the_replay_experiment_runs_end_to_end_on_a_log(tmp_path, mlflow_uri):
    """``+experiment=online_replay`` on a log in the documented format: every learner, the
    control, MLflow metrics and the results file; the texts embedded by the project's MiniLM."""
    pytest.importorskip("sentence_transformers", reason="the text extra embeds the log's texts")
    import mlflow

    from conftest import compose_cfg
    from streamml.train import train

    path = tmp_path / "events.csv"
    synthetic_log(n_users=30, n_items=15).to_csv(path, index=False)
    cfg = compose_cfg(["+experiment=online_replay", "scenario.source=log", f"scenario.path={path}",
                       f"scenario.cache_dir={tmp_path / 'cache'}", "scenario.min_events=15",
                       "baselines=head_only",
                       "trainer.max_epochs=5", "online.k=2", "online.factors=svd"])
    metrics = train(cfg)
    run = mlflow.search_runs(experiment_names=["online_replay"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.tags["scenario"] == "replay"
    for c in (5, 10):
        assert metrics[f"probe_auc_at_{c}"] == pytest.approx(run.data.metrics[f"probe_auc_at_{c}"])
        assert metrics[f"probe_lift_at_{c}.head_only"] == 0
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/replay.md")
    assert "## Control: labels shuffled" in text and "| mixed |" in text and "| head_only |" in text
    assert list((tmp_path / "cache").glob("embeddings-*.npy"))  # cached where asked, not in the repository
