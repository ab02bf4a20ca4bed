"""Bytes per key and batched throughput of the SQLite and Redis state stores at 1M users.

Writes ``--n-users`` keys ``(user, query)`` of the online learner's schema (built
from the online experiment config, so it follows the rule's fields) in batches,
then reports

- bytes per key: the SQLite file size after a WAL checkpoint / keys, and the
  growth of Redis ``INFO memory`` ``used_memory`` / keys (a fresh ``redis-server``
  without persistence, started here on a free loopback port);
- batched ``get_many`` and ``update_many`` throughput (random distinct keys,
  median over repeats) and single-key latency (p50, p99) of both calls.

Run from the repository root::

    python experiments/bench_stores.py                       # 1M users, writes experiments/stores_benchmark.md
    python experiments/bench_stores.py --n-users 20000 --out /tmp/x.md   # a quick look
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamml.provenance import git_commit, machine  # noqa: E402
from tests.helpers import free_port  # noqa: E402


def learner_schema(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    rng = np.random.default_rng(0)
    make = instantiate(cfg.online)
    dim = int(cfg.data.embedding_dim) if "data" in cfg and "embedding_dim" in cfg.data else 384
    learner = make(items=rng.standard_normal((20, dim)).astype(np.float32), item_query=np.zeros(20, int), head_scores=None)
    return dict(learner.schema)


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def random_values(schema: dict, n: int, rng) -> dict:
    out = {}
    for name, f in schema.items():
        if f.dtype.kind == "f":
            out[name] = rng.standard_normal((n, *f.shape)).astype(f.dtype)
        else:
            out[name] = rng.integers(0, 100, (n, *f.shape)).astype(f.dtype)
    return out


def make_keys(users: np.ndarray, n_queries: int) -> list[tuple[int, str]]:
    return [(u, f"topic_{u % n_queries}") for u in users.tolist()]


def fill(store, schema, n_users, batch, n_queries, desc):
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for lo in tqdm(range(0, n_users, batch), desc=desc, unit_scale=batch, mininterval=2):
        users = np.arange(lo, min(lo + batch, n_users))
        store.put_many(make_keys(users, n_queries), random_values(schema, len(users), rng))
    return time.perf_counter() - t0


def throughput(store, schema, n_users, batch, n_queries, repeats, singles):
    rng = np.random.default_rng(1)
    gets, updates = [], []
    for _ in range(repeats):
        keys = make_keys(rng.choice(n_users, batch, replace=False), n_queries)
        t0 = time.perf_counter()
        store.get_many(keys)
        gets.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.update_many(keys, lambda s: {name: v * 0.5 if v.dtype.kind == "f" else v for name, v in s.items()})
        updates.append(time.perf_counter() - t0)
    one_get, one_update = [], []
    for u in rng.choice(n_users, singles, replace=False).tolist():
        key = make_keys(np.array([u]), n_queries)
        t0 = time.perf_counter()
        store.get_many(key)
        one_get.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.update_many(key, lambda s: {"residual": s["residual"] * 0.5})
        one_update.append(time.perf_counter() - t0)
    ms = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
    return {
        "get keys/s": batch / float(np.median(gets)),
        "update keys/s": batch / float(np.median(updates)),
        "1-key get p50/p99 ms": f"{ms(one_get, 50):.3f} / {ms(one_get, 99):.3f}",
        "1-key update p50/p99 ms": f"{ms(one_update, 50):.3f} / {ms(one_update, 99):.3f}",
    }


def bench_sqlite(schema, args, tmp: Path) -> dict:
    from streamml.stores import SQLiteStore

    path = tmp / "state.db"
    store = SQLiteStore(schema, path, synchronous=args.synchronous)
    secs = fill(store, schema, args.n_users, args.batch, args.n_queries, "sqlite write")
    store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(p.stat().st_size for p in tmp.glob("state.db*"))
    assert len(store) == args.n_users
    row = {"backend": f"SQLite {sqlite3.sqlite_version} (WAL, synchronous={args.synchronous})",
           "bytes/key": size / args.n_users, "write keys/s": args.n_users / secs}
    row.update(throughput(store, schema, args.n_users, args.batch, args.n_queries, args.repeats, args.singles))
    return row


def bench_redis(schema, args, tmp: Path) -> dict:
    import redis

    from streamml.stores.redis import RedisStore, connect

    proc, port = start_redis(tmp)
    try:
        client = redis.Redis(port=port)
        version = client.info("server")["redis_version"]
        store = RedisStore(schema, connect(f"redis://127.0.0.1:{port}/0", timeout_s=30))
        before = client.info("memory")["used_memory"]
        secs = fill(store, schema, args.n_users, args.batch, args.n_queries, "redis write")
        after = client.info("memory")["used_memory"]
        assert client.dbsize() == args.n_users + 1  # + the store's metadata hash
        row = {"backend": f"Redis {version} (one string per key)", "bytes/key": (after - before) / args.n_users,
               "write keys/s": args.n_users / secs}
        row.update(throughput(store, schema, args.n_users, args.batch, args.n_queries, args.repeats, args.singles))
        return row
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=int, default=1_000_000)
    parser.add_argument("--n-queries", type=int, default=10, help="each user's key is (user, topic_{user %% n})")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20, help="batches timed per call (median)")
    parser.add_argument("--singles", type=int, default=1000, help="single-key calls timed (p50, p99)")
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "redis"])
    parser.add_argument("--overrides", nargs="*", default=["+experiment=online_personalize"], help="Hydra overrides of the learner config")
    parser.add_argument("--rules", nargs="+", default=[None], help="also run with rule=NAME (its state fields change the schema)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "stores_benchmark.md"))
    args = parser.parse_args()

    at_commit = git_commit(short=True, cwd=REPO)  # before the run: what was measured
    rows, schemas = [], {}
    for rule in args.rules:
        overrides = args.overrides + ([f"rule={rule}"] if rule else [])
        schema = learner_schema(overrides)
        label = " ".join(overrides)
        schemas[label] = schema
        for backend in args.backends:
            with tempfile.TemporaryDirectory(prefix=f"bench_{backend}_") as tmp:
                row = {"bench_sqlite": bench_sqlite, "bench_redis": bench_redis}[f"bench_{backend}"](schema, args, Path(tmp))
            row["schema"] = f"{label}: {sum(f.nbytes for f in schema.values())} B"
            rows.append(row)
            print(row, flush=True)

    cols = ["schema (payload)", "backend", "bytes/key", "write keys/s", "get keys/s", "update keys/s",
            "1-key get p50/p99 ms", "1-key update p50/p99 ms"]
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, float) else str(v)  # noqa: E731
    fields = "; ".join(f"`{label}`: " + ", ".join(f"{n} {f.shape} {f.dtype}" for n, f in sch.items())
                       for label, sch in schemas.items())
    argv = " ".join(sys.argv[1:])
    lines = [
        "# State stores: bytes per key and throughput",
        "",
        f"Command: `python experiments/bench_stores.py{' ' + argv if argv else ''}`  ",
        f"Commit: {at_commit}  ",
        f"Machine: {machine()} (shared with other jobs)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{args.n_users:,} keys `(user, \"topic_k\")` of the learner's schema for each config ({fields}). "
        f"Writes in batches of {args.batch}; "
        f"throughput over batches of {args.batch} random distinct keys (median of {args.repeats}); "
        f"single-key latency over {args.singles} random keys, one process, loopback.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(fmt(r[c if c != "schema (payload)" else "schema"]) for c in cols) + " |" for r in rows),
        "",
        "Target: at most 1024 bytes per key in both. Bytes/key: SQLite file (after a WAL checkpoint) / keys; "
        "Redis `used_memory` growth / keys. Latencies come from a machine shared with other jobs: the p99s are noisy.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if shutil.which("redis-server") is None:
        print("note: redis-server not found; run with --backends sqlite", file=sys.stderr)
    main()
