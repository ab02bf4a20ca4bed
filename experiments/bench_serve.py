"""Load benchmark of the service: open-loop requests at fixed rates, on loopback.

For each backend (SQLite, Redis) and number of uvicorn workers, the script starts
``python -m streamml.serve`` on a free port over a synthetic catalog (``--queries`` queries of
``--items`` items; random 384-d unit embeddings and a random linear head logged to a private
MLflow store), then for each rate:

1. ``rank``: POST /v1/rank for one of ``--users`` users with ``--candidates`` catalog item ids, k=10;
2. ``reward``: POST /v1/events/{id}/reward of one shown item of each event of step 1.

Requests are sent open loop: request i is due at ``t0 + i / rate`` whether or not earlier ones
have answered, and its latency counts from when it was due (so a stalled server is not hidden
by a client that waits). Each cell is bounded by ``--duration`` seconds and ``--max-requests``.
An error is any status other than 200, or a timeout. The load generator runs on the same
machine and cores as the service. Results go to ``--out`` with the command, commit and machine.

``--repeats`` runs the whole grid again (a fresh service each time) and reports each repeat and
the median over repeats. CPU per request is the CPU time the service's processes (not Redis)
and the load generator used during a cell, over its requests. ``--trace DIR`` writes every
request's timings, and the service's own time for it (``server_timing``), to one CSV per cell.

    python experiments/bench_serve.py --duration 8 --repeats 3 --out experiments/serve_benchmark.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers

from streamml.provenance import git_commit, machine  # noqa: E402
from tests.helpers import free_port  # noqa: E402


def make_catalog(root: Path, n_queries: int, n_items: int, dim: int = 384) -> tuple[Path, str]:
    """A synthetic catalog folder and an MLflow store holding one random linear head over it."""
    import json
    from functools import partial

    import mlflow
    import torch

    from streamml import tracking
    from streamml.data import load_queries
    from streamml.offline.heads import LinearHeads
    from streamml.offline.losses import ranknet
    from streamml.offline.module import HeadLearner

    rng = np.random.default_rng(0)
    folder = root / "queries"
    folder.mkdir(parents=True)
    for q in range(n_queries):
        X = rng.normal(size=(n_items, dim))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        rows = [{"text": f"query {q} sentence {i}", "label": "accepted" if i % 2 else "rejected",
                 "embedding": x.round(6).tolist()} for i, x in enumerate(X)]
        (folder / f"q{q:02d}.json").write_text(json.dumps(rows))
    data = load_queries(folder, dim, min_per_class=0)
    learner = HeadLearner(partial(LinearHeads, dim=dim), ranknet, partial(torch.optim.Adam), None)
    learner.groups_ = np.arange(len(data.query_ids))
    heads = LinearHeads(len(data.query_ids), dim)
    with torch.no_grad():
        heads.weight.normal_()
    learner.heads_ = heads.eval()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("default", artifact_location=str(root / "artifacts"))
    mlflow.set_experiment("default")
    with mlflow.start_run():
        tracking.log_model(learner, data.query_ids, dim)
    return folder, uri


class Redis:
    def __init__(self, root: Path):
        self.port, self.dir = free_port(), root / "redis"
        self.dir.mkdir()
        # AOF fsynced every second: like SQLite's synchronous=NORMAL, it survives a killed process
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def persistence(self) -> str:
        """What Redis did in the background during the run: AOF rewrites, delayed fsyncs, snapshots."""
        import redis

        info = redis.Redis(port=self.port).info("persistence")
        keys = ("aof_rewrites", "aof_delayed_fsync", "rdb_saves", "aof_current_size")
        return ", ".join(f"{k} {info.get(k)}" for k in keys)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def start_service(root: Path, backend: str, workers: int, items: Path, tracking_uri: str, redis_port: int | None,
                  extra: list[str] = (), name: str = "", port: int | None = None):
    port = port or free_port()
    if backend == "sqlite":
        db = root / f"serve-{name or workers}.db"
        over = [f"backend.path={db}"]
    else:
        over = ["serve/backend@backend=redis", f"backend.url=redis://127.0.0.1:{redis_port}/0",
                f"backend.prefix=bench{name or workers}"]
    log = open(root / f"serve-{backend}-{workers}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamml.serve", f"port={port}", f"workers={workers}", "log_level=warning",
         f"items_dir={items}", f"tracking_uri={tracking_uri}", *over, *extra],
        cwd=REPO, stdout=log, stderr=log, start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited; see {root}/serve-{backend}-{workers}.log")
        try:
            if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the service did not become ready")


def _server_timing(header: str | None) -> tuple[float, int]:
    """(ms in the app, worker pid) of a ``Server-Timing: app;dur=..., pid;desc=...`` header."""
    dur, pid = float("nan"), -1
    for part in (header or "").split(","):
        name, _, value = part.strip().partition(";")
        if name == "app":
            dur = float(value.split("=", 1)[1])
        elif name == "pid":
            pid = int(value.split("=", 1)[1])
    return dur, pid


async def open_loop(session, url: str, bodies: list, rate: float, duration: float, timeout: float):
    """Send ``bodies`` [(path, json)] at ``rate``/s for at most ``duration`` s; returns
    (latencies of the 200s in ms, errors, responses, trace). ``trace`` has one row per request:
    (i, due, sent, done) in seconds of ``time.perf_counter``, status (0: no answer), and the
    service's Server-Timing (ms in the app, pid) when it sends one."""
    import aiohttp

    n = min(len(bodies), int(rate * duration))
    lat, errors, out, trace = [], Counter(), [None] * n, [None] * n
    t0 = time.perf_counter() + 0.05

    async def one(i):
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sent, status, timing = time.perf_counter(), 0, (float("nan"), -1)
        path, body = bodies[i]
        try:
            async with session.post(url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                data = await r.json()
                status, timing = r.status, _server_timing(r.headers.get("server-timing"))
                if r.status == 200:
                    lat.append((time.perf_counter() - due) * 1000)
                    out[i] = data
                else:
                    errors[str(r.status)] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            errors["timeout" if isinstance(err, asyncio.TimeoutError) else type(err).__name__] += 1
        trace[i] = (i, due, sent, time.perf_counter(), status, *timing)

    await asyncio.gather(*(one(i) for i in range(n)))
    return np.array(lat), errors, [o for o in out if o is not None], trace


def session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session ``sid``
    (the service and its workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def own_cpu_s() -> float:
    """CPU seconds used so far by this process (the load generator)."""
    t = os.times()
    return t.user + t.system


async def run_cell(url, args, rate, rng, cpu=lambda: 0.0):
    import aiohttp

    n = min(args.max_requests, int(rate * args.duration))
    users = rng.integers(0, args.users, n)
    queries = rng.integers(0, args.queries, n)
    first_ids = queries * args.items
    ranks = []
    for u, q, base in zip(users.tolist(), queries.tolist(), first_ids.tolist()):
        cands = (base + rng.choice(args.items, args.candidates, replace=False)).tolist()
        ranks.append(("/v1/rank", {"user": f"user{u}", "query": f"q{q:02d}", "k": 10, "items": cands}))
    conn = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=conn) as session:
        def rewards_of(shown):
            return [(f"/v1/events/{ev['event_id']}/reward",
                     {"rewards": [{"item": ev["items"][int(rng.integers(len(ev["items"])))]["item"],
                                   "label": "accepted" if rng.random() < 0.5 else "rejected"}]}) for ev in shown]

        # warm up every worker on both endpoints (the first requests compile the update kernel
        # and fill caches): not measured
        _, _, warm, _ = await open_loop(session, url, ranks[: min(200, n)], min(rate, 100), 2.0, args.timeout)
        await open_loop(session, url, rewards_of(warm), min(rate, 100), 2.0, args.timeout)
        c0, k0 = cpu(), own_cpu_s()
        rank_lat, rank_err, shown, rank_trace = await open_loop(session, url, ranks, rate, args.duration, args.timeout)
        c1, k1 = cpu(), own_cpu_s()
        rewards = rewards_of(shown)
        reward_lat, reward_err, _, reward_trace = await open_loop(session, url, rewards, rate, args.duration, args.timeout)
        c2, k2 = cpu(), own_cpu_s()
    nr = max(len(rewards), 1)
    return ((rank_lat, rank_err, n, rank_trace, (c1 - c0) / max(n, 1) * 1000, (k1 - k0) / max(n, 1) * 1000),
            (reward_lat, reward_err, len(rewards), reward_trace, (c2 - c1) / nr * 1000, (k2 - k1) / nr * 1000))


def write_trace(path: Path, trace: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = trace[0][1]
    wall = time.time() - time.perf_counter()  # to line requests up with the service's logs
    lines = ["i,due_s,due_epoch_s,send_lag_ms,latency_ms,status,app_ms,pid"]
    lines += [f"{i},{due - t0:.4f},{due + wall:.4f},{(sent - due) * 1000:.2f},{(done - due) * 1000:.2f},{status},{app:.2f},{pid}"
              for i, due, sent, done, status, app, pid in trace]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["sqlite", "redis"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rates", nargs="+", type=float, default=[100, 300])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per (rate, endpoint) cell")
    p.add_argument("--max-requests", type=int, default=3000, help="requests per cell at most")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--items", type=int, default=200, help="catalog items per query")
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as an error")
    p.add_argument("--repeats", type=int, default=1, help="run every cell this many times (one after the other)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--port", type=int, default=None,
                   help="the service's port (default: a free one), e.g. to point another load tool at it")
    p.add_argument("--service-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for the service (e.g. gc_freeze=false), to compare settings")
    p.add_argument("--trace", type=Path, default=None,
                   help="folder for one CSV per cell with every request's timings (turns on the service's server_timing)")
    args = p.parse_args(argv)
    if args.candidates > args.items:
        p.error("--candidates must be <= --items")
    command = "python experiments/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"- command: `{command.strip()}`", f"- commit: {git_commit(short=True, cwd=REPO)}", f"- machine: {machine()}",
              f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    rng = np.random.default_rng(0)
    rows, loads = [], []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        print("building the catalog and the head ...", flush=True)
        items, tracking_uri = make_catalog(root, args.queries, args.items)
        # the catalog builder imported torch and MLflow: freeze that heap, or every full
        # collection in this load generator walks it and stalls the requests it is sending
        gc.collect()
        gc.freeze()
        redis = Redis(root) if "redis" in args.backends else None
        try:
            for repeat in range(1, args.repeats + 1):
                loads.append(os.getloadavg())
                print(f"repeat {repeat}: load average {loads[-1][0]:.2f}", flush=True)
                for backend in args.backends:
                    for workers in args.workers:
                        print(f"starting the service: {backend}, {workers} worker(s) ...", flush=True)
                        extra = [*args.service_overrides, *(["server_timing=true"] if args.trace else [])]
                        proc, url = start_service(root, backend, workers, items, tracking_uri, redis and redis.port, extra,
                                                  name=f"{repeat}-{workers}", port=args.port)
                        try:
                            for rate in args.rates:
                                cells = asyncio.run(run_cell(url, args, rate, rng, lambda: session_cpu_s(proc.pid)))
                                for name, (lat, err, n, trace, cpu_ms, client_ms) in zip(("rank", "reward"), cells):
                                    if args.trace:
                                        write_trace(args.trace / f"{repeat}-{backend}-{workers}-{name}-{rate:.0f}.csv", trace)
                                    p50, p99 = (np.percentile(lat, [50, 99]) if len(lat) else (float("nan"),) * 2)
                                    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(err.items()))
                                    rows.append((repeat, backend, workers, name, rate, n, sum(err.values()), kinds, p50, p99,
                                                 cpu_ms, client_ms))
                                    print(f"  {backend:6s} workers={workers} {name:6s} {rate:5.0f}/s: {n} requests, "
                                          f"{sum(err.values())} errors ({kinds}), p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
                                          f"CPU per request: service {cpu_ms:.2f} ms, load generator {client_ms:.2f} ms",
                                          flush=True)
                        finally:
                            os.killpg(proc.pid, signal.SIGTERM)
                            proc.wait(30)
        finally:
            if redis:
                header.append(f"- Redis persistence at the end (appendfsync everysec, no snapshots): {redis.persistence()}")
                redis.stop()
    header.append("- load average (1 min) at the start of each repeat: " + ", ".join(f"{la[0]:.2f}" for la in loads))
    cells: dict = {}
    for repeat, b, w, e, r, n, err, kinds, p50, p99, cpu, client in rows:
        cells.setdefault((b, w, e, r), []).append((repeat, n, err, kinds, p50, p99, cpu, client))
    summary = [f"Over {args.repeats} repeat(s): requests and errors summed, p50 and p99 the median of the repeats' "
               "(each repeat's p99 listed), CPU per request the median.", "",
               "| backend | workers | endpoint | rate (req/s) | requests | errors | p50 (ms) | p99 (ms) | p99 of each repeat (ms) "
               "| CPU/request, service (ms) | CPU/request, load generator (ms) |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (b, w, e, r), runs in cells.items():
        kinds = "; ".join(x[3] for x in runs if x[3])
        med = lambda j: float(np.median([x[j] for x in runs]))  # noqa: E731
        errors = f"{sum(x[2] for x in runs)}" + (f" ({kinds})" if kinds else "")
        summary.append(f"| {b} | {w} | {e} | {r:.0f} | {sum(x[1] for x in runs)} | {errors} | {med(4):.1f} | {med(5):.1f} | "
                       + ", ".join(f"{x[5]:.1f}" for x in runs) + f" | {med(6):.2f} | {med(7):.2f} |")
    table = ["Every repeat:", "",
             "| repeat | backend | workers | endpoint | rate (req/s) | requests | errors | error kinds | p50 (ms) | p99 (ms) "
             "| CPU/request, service (ms) | CPU/request, load generator (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {rep} | {b} | {w} | {e} | {r:.0f} | {n} | {err} | {kinds} | {p50:.1f} | {p99:.1f} | {cpu:.2f} | {client:.2f} |"
              for rep, b, w, e, r, n, err, kinds, p50, p99, cpu, client in rows]
    method = "\n\n".join(__doc__.split("\n\n")[1:5]).strip()
    text = "\n".join(["# Service load benchmark", "", *header, "", method, "", *summary, "", *table, ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
