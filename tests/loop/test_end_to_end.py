"""The learning loop end to end, through the service's HTTP API and the loop's functions:

1. the service (SQLite) serves ``models:/streamml@champion`` with an exploring policy (``epsilon_slots``);
2. simulated users rank and reward through HTTP: each accepts the items its query file marks accepted
   (90% of the time), and the champion is a head that ranks those items last, so only the exploration
   slots find them;
3. the log is exported; 4. a challenger is retrained from it; 5. OPE prefers it;
6. users' states are migrated to it, it is promoted, and the running service follows the alias;
7. the users' states are there, and on policy the new champion gets more accepts per slate.
"""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import open_dict

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import compose_cfg, write_queries  # noqa: E402
from streamml import tracking  # noqa: E402
from streamml.data import load_queries  # noqa: E402
from streamml.loop.export import SQLiteSource, export  # noqa: E402
from streamml.loop.migrate import run as migrate_run  # noqa: E402
from streamml.loop.promote import promote  # noqa: E402
from streamml.loop.retrain import retrain  # noqa: E402
from streamml.offline.module import HeadLearner  # noqa: E402
from streamml.register import register  # noqa: E402
from streamml.serve.app import create_app  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.serve.serve_helpers import serve_cfg  # noqa: E402

K, USERS = 4, 24


def play(client, truth, users, rounds, rng) -> float:
    """Each of ``users`` ranks ``rounds`` times and answers every shown item; returns accepts per slate."""
    accepts = []
    for _ in range(rounds):
        for u in users:
            query = sorted(truth)[u % len(truth)]
            r = client.post("/v1/rank", json={"user": f"u{u}", "query": query, "k": K})
            assert r.status_code == 200, r.text
            ranked = r.json()
            labels = [bool(truth[query][x["item"]]) == (rng.random() < 0.9) for x in ranked["items"]]
            body = {"rewards": [{"item": x["item"], "label": "accepted" if y else "rejected"}
                                for x, y in zip(ranked["items"], labels)]}
            got = client.post(f"/v1/events/{ranked['event_id']}/reward", json=body)
            assert got.status_code == 200 and got.json()["applied"] == K, got.text
            accepts.append(sum(labels))
    return float(np.mean(accepts))


@pytest.mark.slow
def test_log_to_retrained_promoted_champion_with_states_kept(tmp_path, mlflow_uri):
    items_dir = write_queries(tmp_path / "catalog", n_queries=2, n_per_class=8, seed=4)
    data = load_queries(items_dir, min_per_class=0)
    truth = {q: {int(i): int(data.y[i]) for i in np.flatnonzero(data.query == n)} for n, q in enumerate(data.query_ids)}
    direction = np.stack([data.X[(data.query == q) & (data.y == 1)].mean(0) - data.X[(data.query == q) & (data.y == 0)].mean(0)
                          for q in range(len(data.query_ids))])
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("loop_e2e")  # of this store: not an experiment id an earlier test left active
    with mlflow.start_run() as bad:  # the champion ranks the accepted items last
        tracking.log_model(HeadLearner.from_linear_weights(-5 * direction / np.linalg.norm(direction, axis=1, keepdims=True)),
                           data.query_ids, data.X.shape[1])
    register(bad.info.run_id, "streamml", "champion", tracking_uri=mlflow_uri)
    cfg = serve_cfg(items_dir, mlflow_uri, ["model=models:/streamml@champion", "reload.follow_alias_s=0.05",
                                            "explore.n_explore=2", "events.window_s=3600"], backend="sqlite")
    with open_dict(cfg):
        cfg.backend.path = str(tmp_path / "state.db")
    rng = np.random.default_rng(0)
    app = create_app(cfg)
    with TestClient(app) as client:
        champion_version = client.get("/v1/model").json()["model_version"]
        play(client, truth, range(USERS), rounds=12, rng=rng)  # 2. users rank and reward through HTTP
        before = play(client, truth, range(100, 148), rounds=1, rng=rng)  # on policy: new users' first slate

        # 3. export (every event settled: settle_s=0), 4. a challenger retrained from the log
        state = export(SQLiteSource(tmp_path / "state.db"), tmp_path / "export", settle_s=0, progress=False)
        assert state["rows"] == 12 * USERS + 48
        rcfg = compose_cfg([f"retrain.log={tmp_path / 'export'}", f"retrain.catalog={items_dir}",
                            f"retrain.out={tmp_path / 'log_queries'}", "retrain.holdout=0.3"], config="loop/retrain")
        challenger = retrain(rcfg)["model_uri"]

        # 6a. states carried to the challenger's head before it serves (the migration command, on the live file)
        mcfg = serve_cfg(items_dir, mlflow_uri, [f"model={challenger}"], backend="sqlite")
        with open_dict(mcfg):
            mcfg.backend.path, mcfg.log, mcfg.progress = str(tmp_path / "state.db"), str(tmp_path / "export"), False
        moved = migrate_run(mcfg)
        assert (moved["users"], moved["events"]) == (USERS + 48, (12 * USERS + 48) * K)

        # 5. OPE on the held-out slice prefers the challenger; 6b. promote moves the alias. The default DR:
        # this champion is confidently wrong (it scores the rejected items highest) and its greedy slates
        # match almost no logged (item, position) of 100 held-out slates, so DR leans on its reward model:
        # the champion's scores calibrated on the training slice, which learns that they point the wrong way.
        decision = promote(tmp_path / "export", challenger, tracking_uri=mlflow_uri, items_dir=str(items_dir),
                           holdout=0.3, experiment=None)
        assert decision.evaluation.estimator == "dr"
        assert decision.promoted, decision.message
        table = decision.evaluation.table.set_index("estimator")
        est = table.loc[decision.evaluation.estimator]
        assert est.challenger_low > est.champion, decision.message

        # 6c. the running service follows the alias: no restart
        info = wait_until(lambda: (i := client.get("/v1/model").json())["model_version"] != champion_version and i,
                          "the service serves the promoted challenger", timeout_s=60, every_s=0.02)
        assert info["registry_version"] == str(decision.version)

        # 7. the users' states are there under the new head: each user's scores are not the cold start's
        served = app.state.lifecycle.current
        for query, items in truth.items():
            rows = np.array([served.row_of[i] for i in items])
            cold = served.learner.score("nobody", query, rows)
            for u in range(USERS):
                if sorted(truth)[u % len(truth)] == query:
                    assert not np.allclose(served.learner.score(f"u{u}", query, rows), cold), (u, query)

        # on policy, the new champion gets more accepts per slate than the one it replaced, as OPE predicted
        after = play(client, truth, range(200, 248), rounds=1, rng=rng)
        print(f"\non policy: {before:.3f} -> {after:.3f} accepts per slate; OPE ({decision.evaluation.estimator}): "
              f"{est.champion:.3f} -> {est.challenger:.3f} [{est.challenger_low:.3f}, {est.challenger_high:.3f}]")
        assert after > before + 0.5, (before, after, est.to_dict())
        assert np.sign(after - before) == np.sign(est.challenger - est.champion)
