"""The service runs the mixed learner (``online=mixed population=PATH``) as the replay does:
the same config, the same population fit, the same scores for the same events, on SQLite and
Redis; the population is stored with its head and loaded, not refitted, on restart."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hydra.utils import instantiate
from omegaconf import open_dict

from streamml.online import MixedLearner
from streamml.online.replay import LogError
from streamml.serve.app import create_app
from streamml.serve.backend import MemoryBackend, SQLiteBackend
from streamml.serve.model import load_head
from streamml.serve.population import dumps, loads
from streamml.stores.events import read_catalog
from tests.serve.serve_helpers import serve_cfg

QUERIES = ["topic_0", "topic_1"]


@pytest.fixture(scope="module")
def catalog(served_models):
    items_dir, tracking_uri, uris = served_models
    return read_catalog(items_dir)


@pytest.fixture(scope="module")
def population_log(catalog, tmp_path_factory) -> str:
    """Two kinds of users who agree within their kind; items named by catalog id, and every
    third row by a name that is no catalog id, found by its text."""
    rng = np.random.default_rng(0)
    taste = rng.integers(0, 2, len(catalog.ids))
    rows = []
    for u in range(40):
        kind = u % 2
        for q in catalog.query_ids:
            for i in rng.choice(catalog.of(q), 15, replace=False):
                label = int((taste[i] == kind) != (rng.random() < 0.1))
                item = f"movie-{i}" if len(rows) % 3 == 0 else int(i)
                rows.append({"user": f"p{u}", "query": q, "item": item, "label": label, "time": len(rows),
                             "text": catalog.texts[i]})
    path = tmp_path_factory.mktemp("population") / "population.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def mixed_cfg(served_models, population, backend="sqlite", tmp_path=None, request=None, overrides=()):
    items_dir, tracking_uri, _ = served_models
    cfg = serve_cfg(items_dir, tracking_uri, backend=backend,
                    overrides=["online=mixed", f"population={population}", "explore=greedy", *overrides])
    with open_dict(cfg):
        if backend == "sqlite":
            cfg.backend.path = str(tmp_path / "serve.db")
        elif backend == "redis":
            cfg.backend.url = f"redis://127.0.0.1:{request.getfixturevalue('redis_server').port}/0"
            cfg.backend.prefix = f"mixed{uuid.uuid4().hex[:8]}"
    return cfg


def reference(cfg, catalog, uri, tracking_uri, population_log) -> MixedLearner:
    """The learner as the replay builds it: ``instantiate(cfg.online)(items=, item_query=, head_scores=)``,
    then ``fit_population`` of the log's events with ``item`` the catalog row."""
    head = load_head(uri, tracking_uri)
    item_query = np.asarray(catalog.queries)
    head_scores = np.empty(len(catalog.ids), np.float32)
    for q in catalog.query_ids:
        head_scores[catalog.of(q)] = head.score(q, catalog.X[catalog.of(q)])
    learner = instantiate(cfg.online)(items=catalog.X, item_query=item_query, head_scores=head_scores)
    log = pd.read_csv(population_log)
    text_row = {(q, t): i for i, (q, t) in enumerate(zip(catalog.queries, catalog.texts))}
    events = log.assign(user=log.user.astype(str),
                        item=[text_row[(q, t)] for q, t in zip(log["query"], log["text"])])  # every row's true id
    return learner.fit_population(events[["user", "query", "item", "label", "time"]])


def stream(catalog, users, n=12, seed=1):
    """(user, query, catalog id, label) events in order, as a replay feeds a key's stream."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        for u in users:
            for q in QUERIES:
                out.append((u, q, int(rng.choice(catalog.of(q))), int(rng.random() < 0.5)))
    return out


def served_scores(client, user, query) -> dict[int, float]:
    r = client.post("/v1/rank", json={"user": user, "query": query, "k": 100})
    assert r.status_code == 200, r.text
    return {s["item"]: s["score"] for s in r.json()["items"]}


def send(client, events) -> None:
    """Even events through rank (the item alone) and reward, odd ones as plain feedback."""
    for n, (user, query, item, label) in enumerate(events):
        word = "accepted" if label else "rejected"
        if n % 2 == 0:
            r = client.post("/v1/rank", json={"user": user, "query": query, "k": 1, "items": [item]})
            assert r.status_code == 200, r.text
            r = client.post(f"/v1/events/{r.json()['event_id']}/reward", json={"rewards": [{"item": item, "label": word}]})
            assert r.status_code == 200 and r.json()["applied"] == 1, r.text
        else:
            body = {"user": user, "query": query, "item": item, "label": word, "event_id": f"{user}-{n}"}
            r = client.post("/v1/feedback", json=body)
            assert r.status_code == 200 and r.json()["status"] == "applied", r.text


@pytest.mark.parametrize("backend, covariance", [("sqlite", "full"), ("redis", "full"), ("sqlite", "diagonal")])
def test_the_service_and_the_replay_compute_the_same_scores(backend, covariance, served_models, catalog, population_log,
                                                            tmp_path, request):
    items_dir, tracking_uri, uris = served_models
    cfg = mixed_cfg(served_models, population_log, backend, tmp_path, request)
    cfg.online.covariance = covariance  # the diagonal posterior: a stored population is turned to its prior's basis
    ref = reference(cfg, catalog, uris[1], tracking_uri, population_log)  # the newest run is served
    users = [f"t{uuid.uuid4().hex[:6]}", f"t{uuid.uuid4().hex[:6]}"]
    events = stream(catalog, users)
    with TestClient(create_app(cfg)) as c:
        served = c.app.state.lifecycle.current
        assert type(served.learner) is MixedLearner and served.learner.k == 16 and served.learner.factors == "als"
        assert served.learner.covariance == covariance
        assert served.row_of == {i: i for i in catalog.ids.tolist()}  # service rows are catalog ids, as here
        np.testing.assert_allclose(served.learner.population.prior_cov, ref.population.prior_cov, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(served.learner.population.factors, ref.population.factors, rtol=1e-5, atol=1e-6)
        for user in users:  # cold start: the population's global model
            for q in QUERIES:
                got = served_scores(c, user, q)
                ids = np.array(sorted(got))
                np.testing.assert_allclose([got[i] for i in ids], ref.score(user, q, ids), rtol=1e-5, atol=1e-5)
        send(c, events)
        u, q, i, y = map(np.array, zip(*events))
        ref.learn_many(u.astype(object), q.astype(object), i, y)
        for user in users:
            for q in QUERIES:
                got = served_scores(c, user, q)
                ids = np.array(sorted(got))
                want = ref.score(user, q, ids)
                np.testing.assert_allclose([got[i] for i in ids], want, rtol=1e-5, atol=1e-5)
                assert np.ptp(want - ref.score("nobody", q, ids)) > 1e-3  # the events moved this key's ranking
        state = c.get(f"/v1/users/{users[0]}").json()
        assert {s["query"] for s in state["queries"]} == set(QUERIES) and all(s["residual_norm"] > 0 for s in state["queries"])
        assert c.delete(f"/v1/users/{users[0]}").status_code in (200, 204)
        got = served_scores(c, users[0], QUERIES[0])
        ids = np.array(sorted(got))
        np.testing.assert_allclose([got[i] for i in ids], ref.score("nobody", QUERIES[0], ids), rtol=1e-5, atol=1e-5)


def test_the_population_is_stored_with_its_head_and_loaded_on_restart(served_models, population_log, tmp_path,
                                                                       monkeypatch):
    _, _, uris = served_models
    cfg = mixed_cfg(served_models, population_log, "sqlite", tmp_path)
    fits = []
    fit = MixedLearner.fit_population
    monkeypatch.setattr(MixedLearner, "fit_population", lambda self, events: fits.append(1) or fit(self, events))
    with TestClient(create_app(cfg)) as c:
        send(c, [("ann", "topic_0", 3, 1), ("ann", "topic_0", 5, 0)])
        before = served_scores(c, "ann", "topic_0")
        first = c.app.state.lifecycle.current
    assert len(fits) == 1
    with TestClient(create_app(cfg)) as c:  # a restart (or a second worker): the stored fit, the stored state
        assert served_scores(c, "ann", "topic_0") == before
        assert c.app.state.lifecycle.current.learner.population.fingerprint == first.learner.population.fingerprint
        assert len(fits) == 1
        r = c.post("/v1/admin/reload", json={"model": uris[0]})  # another head: its own fit and its own state
        assert r.status_code == 200, r.text
        assert len(fits) == 2
        other = c.app.state.lifecycle.current
        assert other.head.fingerprint != first.head.fingerprint
        assert not other.learner.store.get_many([("ann", "topic_0")])["gain"].any()  # ann's state is not carried over
    db = SQLiteBackend(tmp_path / "serve.db")
    try:
        names = [n for (n,) in db.db.conn.execute("SELECT name FROM blobs ORDER BY name")]
    finally:
        db.close()
    assert sorted(n.split(":")[1][:16] for n in names) == sorted([first.head.fingerprint[:16], other.head.fingerprint[:16]])


def test_a_bad_population_names_the_file_and_row(served_models, catalog, population_log, tmp_path):
    log = pd.read_csv(population_log)
    log.loc[4, "item"], log.loc[4, "text"] = "unknown", "no such text"
    bad = tmp_path / "bad.csv"
    log.to_csv(bad, index=False)
    with pytest.raises(LogError, match=f"{bad}, row 4: item 'unknown' is not a catalog id of query"):
        with TestClient(create_app(mixed_cfg(served_models, bad, "sqlite", tmp_path))):
            pass
    log = pd.read_csv(population_log)
    log["label"] = log["label"].astype(object)
    log.loc[7, "label"] = "maybe"
    log.to_csv(bad, index=False)
    with pytest.raises(LogError, match=f"{bad}, row 7: label must be"):
        with TestClient(create_app(mixed_cfg(served_models, bad, "sqlite", tmp_path))):
            pass
    with pytest.raises(ValueError, match="MixedLearner learns its prior and factors from a population: pass population=PATH"):
        create_app(mixed_cfg(served_models, "null", "sqlite", tmp_path))
    items_dir, tracking_uri, _ = served_models
    cfg = serve_cfg(items_dir, tracking_uri, overrides=[f"population={population_log}"])
    with pytest.raises(ValueError, match="ResidualLearner has no fit_population"):
        create_app(cfg)


def test_raw_candidates_get_the_global_model_and_their_feedback_is_refused(served_models, catalog, population_log,
                                                                         tmp_path):
    with TestClient(create_app(mixed_cfg(served_models, population_log, "memory"))) as c:
        learner = c.app.state.lifecycle.current.learner
        pop = learner.population
        rows = catalog.of("topic_0")[:5]
        r = c.post("/v1/rank", json={"user": "ann", "query": "topic_0", "k": 5, "embeddings": catalog.X[rows].tolist()})
        assert r.status_code == 200, r.text
        got = {s["item"]: s["score"] for s in r.json()["items"]}
        want = pop.slope * learner.z[rows] + pop.intercept  # the global model without the item effect
        np.testing.assert_allclose([got[j] for j in range(5)], want, rtol=1e-5, atol=1e-5)
        reward = {"rewards": [{"item": 0, "label": "accepted"}]}
        r = c.post(f"/v1/events/{r.json()['event_id']}/reward", json=reward)
        assert r.status_code == 501 and "learns catalog items only" in r.json()["detail"]
        body = {"user": "ann", "query": "topic_0", "embedding": catalog.X[0].tolist(), "label": "accepted", "event_id": "x"}
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == 501 and "learns catalog items only" in r.json()["detail"]
        assert c.get("/v1/users/ann").json()["queries"] == []


def test_thompson_shows_the_greedy_slate_of_the_mixed_learner(served_models, population_log):
    cfg = mixed_cfg(served_models, population_log, "memory", overrides=["explore=thompson"])
    with TestClient(create_app(cfg)) as c:
        out = c.post("/v1/rank", json={"user": "ann", "query": "topic_0", "k": 5}).json()
        scores = [s["score"] for s in out["items"]]
        assert out["policy"].startswith("Thompson") and scores == sorted(scores, reverse=True)
        assert [s["propensity"] for s in out["items"]] == [1.0] * 5


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_blobs_keep_the_first_value_written(kind, tmp_path, request):
    if kind == "memory":
        backend = MemoryBackend()
    elif kind == "sqlite":
        backend = SQLiteBackend(tmp_path / "b.db")
    else:
        from streamml.serve.backend import RedisBackend

        backend = RedisBackend(f"redis://127.0.0.1:{request.getfixturevalue('redis_server').port}/0",
                               prefix=f"b{uuid.uuid4().hex[:8]}")
    try:
        assert backend.blobs.get("a") is None
        assert backend.blobs.put_once("a", b"first\0") == b"first\0"
        assert backend.blobs.put_once("a", b"second") == b"first\0"
        assert backend.blobs.get("a") == b"first\0"
    finally:
        backend.close()


def test_full_and_diagonal_learners_store_their_populations_apart():
    from streamml.serve.population import population_key

    X, q = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32), np.repeat([0, 1], 10)
    events = pd.DataFrame({"user": ["a"], "query": [0], "item": [1], "label": [1], "time": [0.0]})
    keys = {c: population_key("f" * 16, events, MixedLearner(X, q, None, k=2, covariance=c)) for c in ("full", "diagonal")}
    assert keys["full"] != keys["diagonal"] and keys["full"][:16] == keys["diagonal"][:16] == "f" * 16


def test_a_population_round_trips_and_set_population_checks_its_shape(catalog):
    X, q = catalog.X, np.asarray(catalog.queries)
    learner = MixedLearner(X, q, head_scores=np.arange(len(X), dtype=float), k=3, factors="svd")
    rng = np.random.default_rng(0)
    events = pd.DataFrame({"user": rng.integers(0, 20, 400).astype(str), "item": rng.integers(0, len(X), 400),
                           "label": rng.integers(0, 2, 400), "time": np.arange(400)})
    events["query"] = q[events["item"]]
    pop = learner.fit_population(events).population
    back = loads(dumps(pop))
    for name in ("item_effect", "factors", "prior_cov"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pop, name))
    assert (back.slope, back.intercept, back.fingerprint) == (pop.slope, pop.intercept, pop.fingerprint)
    fresh = MixedLearner(X, q, head_scores=np.arange(len(X), dtype=float), k=3, factors="svd").set_population(back)
    ids = catalog.of("topic_0")
    np.testing.assert_array_equal(fresh.score("u", "topic_0", ids), learner.score("u", "topic_0", ids))
    with pytest.raises(ValueError, match=r"this learner needs \(\d+, 5\)"):
        MixedLearner(X, q, k=5).set_population(back)


def test_the_served_learner_has_the_replay_experiments_config(served_models, population_log):
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg

    served = mixed_cfg(served_models, population_log, "memory")
    replay = compose_cfg(["+experiment=online_replay"], tiny=False)
    assert OmegaConf.to_container(served.online, resolve=True) == OmegaConf.to_container(replay.online, resolve=True)
    assert served.online._target_ == "streamml.online.MixedLearner"


def test_serve_refuses_a_malformed_population_before_loading_anything(served_models, population_log, tmp_path,
                                                                    monkeypatch):
    import streamml.serve.lifecycle
    from streamml.serve.__main__ import serve

    monkeypatch.setattr(streamml.serve.lifecycle, "bootstrap", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.csv"
    pd.read_csv(population_log).drop(columns="time").to_csv(bad, index=False)
    cfg = mixed_cfg(served_models, bad, "sqlite", tmp_path, overrides=["port=0"])
    with pytest.raises(LogError, match=rf"{bad}: missing column\(s\) \['time'\]"):
        serve(cfg)
