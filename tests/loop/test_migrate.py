"""Migration over a head change: each key re-solved from its logged rewards equals the key the new
head would have learned online; reruns change nothing; on the service's SQLite backend, end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from streamml.loop.export import _write_chunk
from streamml.loop.migrate import migrate, run
from streamml.serve.backend import SQLiteBackend
from streamml.serve.lifecycle import Lifecycle, bootstrap
from tests.loop.test_retrain import slate
from tests.serve.serve_helpers import serve_cfg


def events(n=60, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user": rng.choice(["ann", "bob", "cy"], n), "query": "q0",
                         "item": rng.integers(0, n_items, n), "label": rng.integers(0, 2, n),
                         "time": np.arange(n, dtype=float), "event_id": [f"e{i}" for i in range(n)]})


def learner_over(cfg, head_scores):
    X = np.random.default_rng(1).normal(size=(len(head_scores), 384)).astype(np.float32)
    return instantiate(cfg.online)(items=X, item_query=np.array(["q0"] * len(head_scores), object), head_scores=head_scores)


@pytest.mark.parametrize("online", ["residual", "mixed"])
def test_migrated_state_is_what_the_new_head_would_have_learned_online(served_models, online):
    cfg = serve_cfg(*served_models[:2], overrides=[f"online={online}"])
    ev = events()
    rng = np.random.default_rng(2)
    old, head_b = learner_over(cfg, rng.normal(size=30)), rng.normal(size=30)
    new, online_b = learner_over(cfg, head_b), learner_over(cfg, head_b)
    for r in ev.itertuples():  # what the old head learned, and what the new one would have learned, online
        old.learn_one(r.user, r.query, r.item, r.label)
        online_b.learn_one(r.user, r.query, r.item, r.label)
    before = {u: old.score(u, "q0", np.arange(30)) for u in ("ann", "bob", "cy")}
    assert migrate(new, ev, chunk=7, progress=False) == {"users": 3, "events": 60}
    for u in ("ann", "bob", "cy"):
        np.testing.assert_allclose(new.score(u, "q0", np.arange(30)), online_b.score(u, "q0", np.arange(30)), rtol=1e-5, atol=1e-6)
        assert not np.allclose(new.score(u, "q0", np.arange(30)), before[u])  # another head, another state
    again = {u: new.score(u, "q0", np.arange(30)) for u in ("ann", "bob", "cy")}
    migrate(new, ev, progress=False)  # a rerun forgets first: the same states, not the events twice
    for u in again:
        np.testing.assert_allclose(new.score(u, "q0", np.arange(30)), again[u], rtol=1e-6)


def test_items_outside_the_catalog_and_missing_columns_are_named(served_models):
    cfg = serve_cfg(*served_models[:2])
    learner = learner_over(cfg, np.zeros(30))
    ev = events().assign(item=5)
    with pytest.raises(ValueError, match=r"event 'e0': item 5 is not in the new head's catalog"):
        migrate(learner, ev, row_of={1: 0}, progress=False)
    with pytest.raises(ValueError, match=r"lack the columns \['label'\]"):
        migrate(learner, ev.drop(columns="label"), progress=False)


def service_with_log(served_models, tmp_path, name="state.db", n_slates=40):
    """A SQLite service database that served head 0 (catalog loaded, head published), an export of
    ``n_slates`` labelled slates, and the ``loop/migrate`` config that moves it to head 1."""
    items_dir, tracking_uri, uris = served_models
    cfg = serve_cfg(items_dir, tracking_uri, overrides=[f"model={uris[0]}"], backend="sqlite")
    with open_dict(cfg):
        cfg.backend.path = str(tmp_path / name)
    backend = instantiate(cfg.backend)
    bootstrap(cfg, backend, publish=True)  # the service's first start: catalog loaded, head 0 published
    query = backend.catalog.queries()[0]
    qids, _, _ = backend.catalog.items(query)
    backend.close()
    rng = np.random.default_rng(3)
    rows = []
    for n in range(n_slates):
        shown = rng.choice(qids, 3, replace=False).tolist()
        rows.append(slate(f"e{n:03d}", f"user{n % 4}", query, shown, [0.5, 0.3, 0.2],
                          [(shown[0], int(rng.random() < 0.5)), (shown[2], 1)], 1_700_000_000.0 + 40_000 * n))
    export = tmp_path / "export"
    if not export.exists():
        _write_chunk(export, [dict(r, date=f"2023-11-{14 + n // 10:02d}") for n, r in enumerate(rows)], 0)
    with open_dict(cfg):
        cfg.model, cfg.log, cfg.progress = uris[1], str(export), False
    return cfg, rows, query, qids


def scores_under(cfg, uri, query, qids, users):
    """Each user's scores on ``qids`` as the service serving ``uri`` from ``cfg``'s backend sees them."""
    backend = instantiate(cfg.backend)
    try:
        lc = Lifecycle(backend, instantiate(cfg.online), cfg.tracking_uri)
        served = lc.activate(lc.prepare(uri))
        probe = np.array([served.row_of[i] for i in qids])
        return {u: served.learner.score(u, query, probe) for u in users}
    finally:
        backend.close()


def test_the_command_writes_the_new_heads_states_into_the_services_backend(served_models, tmp_path):
    cfg, rows, query, qids = service_with_log(served_models, tmp_path)
    result = run(cfg)
    assert (result["users"], result["events"]) == (4, 80) and len(result["head"]) == 12
    # the service, activating head 1, finds the states; a fresh learner of head 1 fed the same events agrees
    backend = SQLiteBackend(cfg.backend.path)
    lc = Lifecycle(backend, instantiate(cfg.online), cfg.tracking_uri)
    prepared = lc.prepare(cfg.model)
    reference = instantiate(cfg.online)(items=prepared.X, item_query=prepared.item_query, head_scores=prepared.head_scores)
    backend.close()
    for r in rows:
        for x in r["rewards"]:
            reference.learn_one(r["user"], query, prepared.row_of[x["item"]], x["label"])
    served = scores_under(cfg, cfg.model, query, qids, ["user0", "user3", "nobody"])
    probe = np.array([prepared.row_of[i] for i in qids])
    for u in ("user0", "user3"):
        np.testing.assert_allclose(served[u], reference.score(u, query, probe), rtol=1e-5, atol=1e-6)
        assert not np.allclose(served[u], served["nobody"])
