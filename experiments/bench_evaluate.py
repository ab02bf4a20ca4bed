"""What evaluation and promotion cost: OPE time per held-out slate, the command end to end, and the
time the service takes to follow a moved alias.

1. ``estimate_targets`` (two greedy heads, DR + SNIPS + IPS, 2000 bootstrap replicates over
   users) on ``n`` held-out slates of ``data/queries`` (58 items per query, k = 5), logged by
   ``EpsilonSlots(n_explore=2)``: in-process, no MLflow.
2. ``python -m streamml.loop evaluate`` and ``promote`` as subprocesses on a log of ``--n-cli``
   slates, two heads logged to a fresh MLflow store: what a user waits for.
3. The service (in-process, ``reload.follow_alias_s=0.5``) serving ``models:/bench@champion``:
   seconds from ``set_registered_model_alias`` to ``/v1/model`` naming the new version.

Run from the repository root::

    python experiments/bench_evaluate.py     # writes experiments/bench_evaluate.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamml.provenance import git_commit, machine  # noqa: E402

K = 5


def world(items_dir: Path):
    from streamml.data import load_queries

    data = load_queries(items_dir, min_per_class=0)
    direction = np.stack([data.X[(data.query == q) & (data.y == 1)].mean(0) - data.X[(data.query == q) & (data.y == 0)].mean(0)
                          for q in range(len(data.query_ids))])
    direction *= 5 / np.linalg.norm(direction, axis=1, keepdims=True)
    return data, {"good": direction, "random": np.random.default_rng(1).normal(size=direction.shape) / 4}


def write_log(folder: Path, data, n: int, n_users: int = 500, seed: int = 0) -> Path:
    """``n`` slates in the export's schema: each user accepts the query's accepted items."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamml.loop.export import SCHEMA, SCHEMA_VERSION
    from streamml.online.policies import EpsilonSlots

    rng, policy, rows = np.random.default_rng(seed), EpsilonSlots(n_explore=2), []
    for e in range(n):
        u = int(rng.integers(n_users))
        ids = np.flatnonzero(data.query == u % len(data.query_ids))
        slate = policy.select(rng.normal(size=len(ids)), K, rng)
        shown = ids[slate.items]
        rows.append({"event_id": f"e{e:08d}", "user": f"u{u}", "query": data.query_ids[u % len(data.query_ids)],
                     "created": 1.7e9 + e, "policy": repr(policy), "bucket": "main", "head": "logging",
                     "raw_candidates": False, "items": shown.tolist(), "positions": list(range(K)),
                     "propensities": slate.propensities.tolist(),
                     "rewards": [{"item": int(i), "position": p, "label": int(data.y[i]), "time": 1.7e9 + e}
                                 for p, i in enumerate(shown)],
                     "n_rewards": K, "schema_version": SCHEMA_VERSION, "date": "2023-11-14"})
    (folder / "date=2023-11-14").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA).drop_columns(["date"]),
                   folder / "date=2023-11-14" / "part-000000.parquet")
    return folder


def bench_ope(data, weights, sizes) -> list[str]:
    from streamml.loop.evaluate import _catalog, estimate_targets
    from streamml.loop.logs import read_slates
    from streamml.serve.model import Head

    catalog = _catalog(REPO / "data" / "queries")
    heads = {name: Head.linear(data.query_ids, w, np.zeros(len(w)), uri=name) for name, w in weights.items()}
    lines = ["| slates | seconds | ms per slate | good (dr) | good: truth | random (dr) | random: truth |",
             "|---|---|---|---|---|---|---|"]
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            slates = read_slates(write_log(Path(tmp) / "log", data, n))
        start = time.perf_counter()
        t = estimate_targets(slates, heads, catalog, reward_model="random")
        s = time.perf_counter() - start
        dr = t[t.estimator == "dr"].set_index("target")
        cell = {name: f"{dr.loc[name, 'estimate']:.3f} [{dr.loc[name, 'low']:.3f}, {dr.loc[name, 'high']:.3f}] | "
                      f"{truth(slates, heads[name], catalog, data):.3f}" for name in heads}
        lines.append(f"| {n} | {s:.2f} | {1000 * s / n:.2f} | {cell['good']} | {cell['random']} |")
        print(lines[-1], flush=True)
    return lines


def truth(slates, head, catalog, data) -> float:
    """The greedy target's on-policy accepts per slate on the same slates: its top k's accepted items."""
    top = {q: data.y[ids[np.argsort(-head.score(q, X), kind="stable")[:K]]].sum() for q, (ids, X) in catalog.items()}
    return float(np.mean([top[q] for q in slates["query"]]))


def bench_cli_and_follow(data, weights, n: int) -> list[str]:
    import mlflow

    from streamml import tracking
    from streamml.offline.module import HeadLearner
    from streamml.register import register

    tmp = Path(tempfile.mkdtemp())
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("default", artifact_location=str(tmp / "artifacts"))
    mlflow.set_experiment("default")
    runs = {}
    for name, w in weights.items():
        learner = HeadLearner.from_linear_weights(w)
        with mlflow.start_run() as run:
            tracking.log_model(learner, data.query_ids, w.shape[1])
        runs[name] = run.info.run_id
    register(runs["random"], "bench", "champion", tracking_uri=uri)
    log = write_log(tmp / "log", data, n)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    lines = ["| command | seconds | exit code | last line |", "|---|---|---|---|"]
    for command in ("evaluate", "promote"):
        args = [sys.executable, "-m", "streamml.loop", command, f"log={log}", f"challenger={runs['good']}",
                f"items_dir={REPO / 'data' / 'queries'}", f"out={tmp / 'out'}"]
        args += ["champion=models:/bench@champion"] if command == "evaluate" else ["name=bench"]
        start = time.perf_counter()
        out = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True)
        s = time.perf_counter() - start
        last = (out.stdout.strip().splitlines() or [out.stderr.strip()])[-1].replace(uri, "the run's temporary MLflow store")
        lines.append(f"| `python -m streamml.loop {command}` ({n} slates) | {s:.1f} | {out.returncode} | {last[:120]} |")
        print(lines[-1], flush=True)
    return lines + [""] + follow(uri, REPO / "data" / "queries")


def follow(uri: str, items_dir: Path, moves: int = 5) -> list[str]:
    from fastapi.testclient import TestClient

    from streamml.serve.app import create_app
    from tests.serve.serve_helpers import serve_cfg

    client = mlflow_client(uri)
    cfg = serve_cfg(items_dir, uri, ["model=models:/bench@champion", "reload.follow_alias_s=0.5"])
    waits = []
    with TestClient(create_app(cfg)) as c:
        for i in range(moves):
            target = "1" if c.get("/v1/model").json()["registry_version"] != "1" else "2"
            start = time.perf_counter()
            client.set_registered_model_alias("bench", "champion", target)
            deadline = start + 120
            while c.get("/v1/model").json()["registry_version"] != target:
                assert time.perf_counter() < deadline, "the service did not follow the alias within 120 s"
                time.sleep(0.01)
            waits.append(time.perf_counter() - start)
    return [f"Alias moved {moves} times, `reload.follow_alias_s=0.5`: seconds until `/v1/model` names the new "
            f"version: median {np.median(waits):.2f}, max {max(waits):.2f} (the poll interval plus loading and "
            "checking the head on the 348-item catalog)."]


def mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--n-cli", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "bench_evaluate.md")
    args = parser.parse_args()
    commit, start = git_commit(short=True, cwd=REPO), time.time()
    data, weights = world(REPO / "data" / "queries")
    ope = bench_ope(data, weights, args.sizes)
    cli = bench_cli_and_follow(data, weights, args.n_cli)
    argv = " ".join(sys.argv[1:])
    text = "\n".join([
        "# Evaluation and promotion: what they cost (issue 19, point 4)", "",
        f"Command: `python experiments/bench_evaluate.py{' ' + argv if argv else ''}`  ",
        f"Commit: {commit}  ", f"Machine: {machine()} (shared with other jobs)  ",
        f"Run time: {time.time() - start:.0f} s", "",
        "Logs of `data/queries` slates (k = 5 of 58 items, `EpsilonSlots(n_explore=2)` over random scores, 500 users "
        "who accept exactly the accepted items). `good` scores along each query's accepted-minus-rejected direction, "
        "`random` is a random head. `truth`: the greedy target's on-policy accepts per slate on the same slates "
        "(the accepted items among its top 5 of the query), exact; the interval is DR's 95% bootstrap over users.", "",
        "## OPE, in-process (`estimate_targets` on all n slates: 2 targets x DR, SNIPS, IPS, 2000 bootstrap replicates)", "",
        *ope, "", "## The commands (held-out 30% of the log, champion `random`, challenger `good`) and the service", "", *cli, ""])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
