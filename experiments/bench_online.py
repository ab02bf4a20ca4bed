"""Benchmark of the online residual learner: latency, throughput, memory per key.

Not a test (timings have no place in tests): run it by hand and commit the
markdown it writes.

    python experiments/bench_online.py --out experiments/online_benchmark.md

Setup: a synthetic catalog (100 queries x 100 items, 384-d unit vectors, random
head scores) and 1,000,000 simulated users, each searching one query, so 1M
(user, query) keys. Events pick a user uniformly and one of their query's items,
accept or reject at random (the content of the feedback does not change the cost).

The numba kernels are compiled (or loaded from numba's cache) before anything is
timed; the time of that first use is measured on its own, in fresh processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numba
import numpy as np
import torch

import streamml.online.learner as online
from streamml.online import PairwiseSGD, PointwiseSGD, ResidualLearner

RULES = {"pairwise": PairwiseSGD, "pointwise": PointwiseSGD}
NOTES_MARKER = "<!-- notes: kept when the tables above are regenerated -->"
N_QUERIES, PER_QUERY, DIM = 100, 100, 384


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def catalog(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_QUERIES * PER_QUERY, DIM)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    item_query = np.repeat(np.arange(N_QUERIES), PER_QUERY)
    return X, item_query, rng.standard_normal(len(X))


def events(rng, n: int, users: np.ndarray):
    """n events over the given users; a user's query is user % N_QUERIES."""
    u = users[rng.integers(0, len(users), n)] if len(users) != n else users
    q = u % N_QUERIES
    items = q * PER_QUERY + rng.integers(0, PER_QUERY, n)
    return u, q, items, rng.integers(0, 2, n)


def calibrate() -> float:
    """Microseconds for one numpy add of two 384-float vectors: how busy the machine is
    (about 0.3 us on an idle core; every numpy call costs at least this much)."""
    a = np.ones(DIM, np.float32)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10_000):
            a + a
        times.append((time.perf_counter() - t) / 10_000)
    return 1e6 * float(np.median(times))


FIRST_USE = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from streamml.online import ResidualLearner, {rule}
t1 = time.perf_counter()
X = np.random.default_rng(0).standard_normal((20, 384)).astype(np.float32)
learner = ResidualLearner(X, np.zeros(20, int), rule={rule}())
n = 10_000  # two threads' worth (PARALLEL_MIN_EVENTS each): the threaded path too
learner.learn_many(np.arange(n), np.zeros(n, int), np.arange(n) % 20, np.arange(n) % 2)
learner.learn_one(0, 0, 1, 1)
t2 = time.perf_counter()
learner.learn_many(np.arange(n), np.zeros(n, int), np.arange(n) % 20, np.arange(n) % 2)
learner.learn_one(0, 0, 1, 1)
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first": t2 - t1, "second": t3 - t2}}))
"""


def first_use_seconds(name: str, cache_dir: str | None) -> float:
    """Seconds the first learn_many + learn_one take in a fresh process, minus the second
    ones: numba compiling the kernels (no cache) or loading them from its cache."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(online.__file__))))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run(
        [sys.executable, "-c", FIRST_USE.format(rule=RULES[name].__name__)],
        env=env, capture_output=True, text=True, check=True,
    )
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return t["first"] - t["second"]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_rule(name, rule, args, rng) -> dict:
    X, item_query, head = catalog()
    n_users = args.users
    users = np.arange(n_users)
    out = {"rule": name}

    # ---- compile (or load from the cache) the kernels, serial and threaded, before any timing
    warm = ResidualLearner(X, item_query, rule=rule, head_scores=head)
    warm.learn_many(*events(rng, 2 * online.PARALLEL_MIN_EVENTS, users[:1000]))
    warm.learn_one(0, 0, 0, 1)
    del warm

    # ---- memory: 1M keys, one event each (arrays only grow; measure the whole process too)
    gc.collect()
    tracemalloc.start()
    rss0 = rss_bytes()
    learner = ResidualLearner(X, item_query, rule=rule, head_scores=head)
    for chunk in np.array_split(rng.permutation(users), 4):
        learner.learn_many(*events(rng, len(chunk), chunk))
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n_keys = len(learner.store)
    out.update(
        keys=n_keys,
        store_bytes_per_key=learner.store.nbytes / n_keys,
        traced_bytes_per_key=traced / n_keys,
        traced_peak_bytes_per_key=peak / n_keys,
        rss_bytes_per_key=(rss_bytes() - rss0) / n_keys,
    )

    # ---- steady state: fill the feedback buffers
    for _ in range(2):
        learner.learn_many(*events(rng, n_users, users))

    # ---- batched throughput, on 1 and 2 threads (kernels already compiled above)
    default_threads = online.THREADS
    for threads in args.threads:
        online.THREADS = threads
        for batch in args.batch:
            batches = [events(rng, batch, users) for _ in range(args.repeats)]
            it = iter(batches)
            t = median_time(lambda: learner.learn_many(*next(it)), args.repeats)
            out[f"events_per_s[batch={batch},threads={threads}]"] = batch / t
    online.THREADS = default_threads

    # ---- the numpy path, for comparison: what every other store takes (torch gathers on)
    if args.numpy_compare:
        online.USE_NUMBA = False
        batch = min(args.batch)
        batches = [events(rng, batch, users) for _ in range(args.repeats)]
        it = iter(batches)
        out[f"numpy_path_events_per_s[batch={batch},torch_threads=1]"] = batch / median_time(
            lambda: learner.learn_many(*next(it)), args.repeats
        )
        online.USE_NUMBA = True

    # ---- single-event latency, on existing keys
    medians, p90s, p99s = [], [], []
    for _ in range(args.repeats):
        ev = list(zip(*[a.tolist() for a in events(rng, args.single, users)]))
        lat = np.empty(len(ev))
        learn_one = learner.learn_one
        for i, (u, q, item, y) in enumerate(ev):
            t = time.perf_counter()
            learn_one(u, q, item, y)
            lat[i] = time.perf_counter() - t
        medians.append(np.median(lat))
        p90s.append(np.percentile(lat, 90))
        p99s.append(np.percentile(lat, 99))
    out.update(
        learn_one_median_us=1e6 * float(np.median(medians)),
        learn_one_p90_us=1e6 * float(np.median(p90s)),
        learn_one_p99_us=1e6 * float(np.median(p99s)),
    )
    del learner
    gc.collect()
    return out


def _shard_worker(rank, procs, name, args, barrier, queue):
    """One process owning the users with ``user % procs == rank``: populate, warm up, then time."""
    torch.set_num_threads(1)
    online.THREADS = 1
    rng = np.random.default_rng(rank)
    X, item_query, head = catalog()
    users = np.arange(rank, args.users, procs)
    learner = ResidualLearner(X, item_query, rule=RULES[name](), head_scores=head)
    learner.learn_many(*events(rng, len(users), rng.permutation(users)))
    for _ in range(2):
        learner.learn_many(*events(rng, len(users), users))
    batch = max(args.batch) // procs
    batches = [events(rng, batch, users) for _ in range(args.repeats)]
    barrier.wait()
    t = time.perf_counter()
    for b in batches:
        learner.learn_many(*b)
    queue.put((batch * len(batches), time.perf_counter() - t))


def bench_sharded(name: str, args) -> dict:
    """Aggregate throughput of ``procs`` processes, each owning a shard of the users."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(args.procs), ctx.Queue()
    workers = [
        ctx.Process(target=_shard_worker, args=(r, args.procs, name, args, barrier, queue)) for r in range(args.procs)
    ]
    for w in workers:
        w.start()
    done = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    n_events = sum(n for n, _ in done)
    key = f"events_per_s[{args.procs} processes, batch={max(args.batch)} total, threads=1 each]"
    return {key: n_events / max(t for _, t in done)}


def busy_processes(min_cpu: float = 20.0) -> str:
    """Other processes using more than ``min_cpu`` % of a core right now (from ``ps``)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    busy = []
    for line in out.splitlines()[1:]:
        pid, cpu, cmd = line.split(None, 2)
        if float(cpu) >= min_cpu and int(pid) != os.getpid() and "ps -eo" not in cmd:
            busy.append(f"`{cmd[:90]}` ({cpu} %)")
    return "; ".join(busy) or "none"


def machine() -> dict:
    model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": model.split(":", 1)[-1].strip(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "half": "F16C instructions" if online.NATIVE_HALF else "software conversion",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "busy": busy_processes(),
    }


def report(results: list[dict], args, before: dict, after: dict, seconds: float) -> str:
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [
        "# Online learner benchmark",
        "",
        f"Generated by `experiments/bench_online.py` on {dt.date.today().isoformat()} in {seconds:.0f} s.",
        "",
        f"    cd /work/main && {cmd}",
        "",
        f"Machine: {before['nproc']} cores ({before['cpu']}), Python {before['python']}, "
        f"numpy {before['numpy']}, torch {before['torch']}, numba {before['numba']} "
        f"(float16 by {before['half']}). Load average (1, 5, 15 min) "
        f"{before['load']} at the start and {after['load']} at the end. Other processes above 20 % CPU: "
        f"{before['busy']} at the start; {after['busy']} at the end. The machine is shared, "
        "so the figures are medians over repeats and still move by tens of percent between runs.",
        "",
        f"Workload: {args.users:,} users, one query each (so {args.users:,} `(user, query)` keys), "
        f"{N_QUERIES} queries x {PER_QUERY} catalog items of {DIM}-d embeddings, float16 residuals, "
        "default rules (pairwise buffer 4 + 4 item ids). Throughput batches draw users uniformly; "
        f"medians over {args.repeats} batches; `threads`: `streamml.online.THREADS`. `learn_one` latency: {args.single:,} "
        f"events on existing keys, median of {args.repeats} runs' median / p90 / p99. `first_use_s`: "
        "the extra time of the first `learn_many` + `learn_one` in a fresh process, with an empty "
        "numba cache (compiling) and with the cache filled (loading); never inside the timings above.",
        "",
        "| | " + " | ".join(r["rule"] for r in results) + " | target |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    target = {"learn_one_median_us": "<= 20 us", "store_bytes_per_key": "<= 1024 B"}
    for key in results[0]:
        if key == "rule":
            continue
        vals = []
        for r in results:
            v = r[key]
            vals.append(f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}")
        t = target.get(key, ">= 1,000,000" if key.startswith("events_per_s") else "")
        lines.append(f"| {key} | " + " | ".join(vals) + f" | {t} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="learn_many threads (online.THREADS)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--single", type=int, default=20_000, help="learn_one events per latency run")
    p.add_argument("--procs", type=int, default=2, help="also run this many processes, each owning a shard of the users")
    p.add_argument("--numpy-compare", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rules", nargs="+", default=["pairwise", "pointwise"])
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the numpy-path comparison; torch threads only fought the other tenants
    before = machine()
    t0 = time.time()
    results = []
    for name in args.rules:
        res = {}
        with tempfile.TemporaryDirectory() as empty:
            res["first_use_s[no cache]"] = first_use_seconds(name, empty)
        first_use_seconds(name, None)  # fills the default cache if it was empty
        res["first_use_s[cache]"] = first_use_seconds(name, None)
        res = bench_rule(name, RULES[name](), args, np.random.default_rng(0)) | res
        if args.procs > 1:
            res.update(bench_sharded(name, args))
        res["numpy_add_384_floats_us"] = calibrate()
        print(res, flush=True)
        results.append(res)
    text = report(results, args, before, machine(), time.time() - t0)
    print(text)
    if args.out:
        notes = ""  # hand-written analysis below the marker survives a re-run
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = f.read()
            if NOTES_MARKER in old:
                notes = "\n" + old[old.index(NOTES_MARKER) :]
        with open(args.out, "w") as f:
            f.write(text + notes)


if __name__ == "__main__":
    main()
