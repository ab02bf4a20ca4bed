"""The service on a 3-master Redis Cluster holding ``--users`` users' states (1M): bytes per key
and rank latency, by our load generator and by ``hey``.

1. Starts a 3-master Redis Cluster on loopback ports (``tests/stores/redis_fixtures.py``'s
   ``RedisClusterServers``; AOF ``appendfsync everysec``, no snapshots, as ``bench_serve.py``'s
   Redis) and the service on it (``backend.cluster=true``, ``--workers`` workers) over
   ``bench_serve.py``'s synthetic catalog.
2. Writes one state per user, key ``("user<u>", "q<u % queries>")`` with a random residual, with
   the store's batch write (``RedisStore.put_many``, a pipeline per node) in batches of ``--batch``,
   into the very store the service reads (prefix and schema read back from the cluster).
   Bytes per key: the growth of ``used_memory`` summed over the 3 masters / keys, and the mean
   ``MEMORY USAGE`` of ``--sample`` random state keys.
3. For each rate: POST /v1/rank (100 candidates of the user's query, k=10) by our open-loop
   generator (a random user of the ``--users`` per request) and by ``hey`` (one body, one user of
   the ``--users``), as in ``bench_serve_hey.py`` (see there how the two tools differ).

    python experiments/bench_serve_cluster.py --users 1000000 --repeats 3 --out cluster.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from bench_serve import make_catalog, session_cpu_s, start_service  # noqa: E402
from bench_serve_hey import HEY, header, measure, rank_bodies, table, warm_up  # noqa: E402

from tests.stores.redis_fixtures import RedisClusterServers  # noqa: E402

SETTINGS = ("--appendfsync", "everysec", "--cluster-require-full-coverage", "no")


def used_memory(cluster) -> int:
    import redis

    return sum(redis.Redis(port=n.port).info("memory")["used_memory"] for n in cluster.nodes)


def state_store(client, prefix: str):
    """The service's state store in the cluster: its prefix (``<prefix>:s<fingerprint>``) and
    schema, read back from the store's meta record."""
    from streamml.stores import Field
    from streamml.stores.redis import RedisStore

    metas = [k.decode() for k in client.scan_iter(match=f"{prefix}:s*:meta", count=1000)]
    if len(metas) != 1:
        raise RuntimeError(f"expected one state store under {prefix!r}, found {metas}")
    signature = json.loads(client.hget(metas[0], "schema"))
    schema = {name: Field(tuple(shape), np.dtype(dtype), fill) for name, shape, dtype, fill in signature}
    return RedisStore(schema, client, prefix=metas[0][: -len(":meta")])


def fill(store, n_users: int, n_queries: int, batch: int) -> float:
    """One random state per user; returns the seconds it took."""
    rng = np.random.default_rng(2)
    t0 = time.perf_counter()
    for lo in range(0, n_users, batch):
        users = range(lo, min(lo + batch, n_users))
        values = {name: (0.05 * rng.standard_normal((len(users), *f.shape))).astype(f.dtype) if f.dtype.kind == "f"
                  else np.full((len(users), *f.shape), f.fill, f.dtype) for name, f in store.schema.items()}
        store.put_many([(f"user{u}", f"q{u % n_queries:02d}") for u in users], values)
        if (lo // batch) % 20 == 0:
            print(f"  {lo + len(users):,} users written, {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--sample", type=int, default=1000, help="keys whose MEMORY USAGE is read")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rates", nargs="+", type=float, default=[100])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--hey-concurrency", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="load cells per rate (one service, one fill)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    head = header(args, argv, "bench_serve_cluster.py")
    query_of = lambda u: u % args.queries  # noqa: E731
    rng = np.random.default_rng(0)
    fixed = rank_bodies(np.random.default_rng(1), 1, args.users, args.queries, args.items, args.candidates, query_of)[0]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp)
        body_file = root / "rank.json"
        body_file.write_text(json.dumps(fixed[1]))
        items, tracking_uri = make_catalog(root, args.queries, args.items)
        gc.collect()
        gc.freeze()
        cluster = RedisClusterServers(root / "cluster", extra=SETTINGS).start()
        proc = None
        try:
            client = cluster.client()
            version = cluster.nodes[0].client().info("server")["redis_version"]
            proc, url = start_service(root, "redis", args.workers, items, tracking_uri, cluster.nodes[0].port,
                                      ["backend.cluster=true"], name="cluster", port=args.port)
            store = state_store(client, "benchcluster")
            before = used_memory(cluster)
            print(f"writing {args.users:,} users' states into {store.prefix} ...", flush=True)
            secs = fill(store, args.users, args.queries, args.batch)
            after = used_memory(cluster)
            keys = [store._rkey_of([f"user{u}", f"q{query_of(u):02d}"])
                    for u in rng.choice(args.users, args.sample, replace=False).tolist()]
            usage = [client.memory_usage(k) for k in keys]
            sizes = [n.client().dbsize() for n in cluster.nodes]
            got = store.get_many([(fixed[1]["user"], fixed[1]["query"])])
            assert any(np.abs(v).sum() > 0 for v in got.values()), "the filled state does not read back"
            notes += [f"- Redis {version}, 3 masters, no replicas, options `{' '.join(SETTINGS)}`; keys per master "
                      f"after the fill: {', '.join(f'{s:,}' for s in sizes)}",
                      f"- state: {store.prefix}, fields "
                      + ", ".join(f"{n} {f.shape} {f.dtype}" for n, f in store.schema.items())
                      + f" ({store.codec.nbytes} B of payload per key)",
                      f"- fill: {args.users:,} keys in {secs:.0f} s ({args.users / secs:,.0f} keys/s), "
                      f"`put_many` in batches of {args.batch:,}",
                      f"- **bytes per key: {(after - before) / args.users:,.0f}** (`used_memory` summed over the 3 masters: "
                      f"{before / 2**20:,.1f} MiB before the fill, {after / 2**20:,.1f} MiB after, / {args.users:,}); "
                      f"`MEMORY USAGE` of {args.sample} random state keys: mean {np.mean(usage):,.0f}, "
                      f"min {min(usage)}, max {max(usage)}"]
            print("\n".join(notes), flush=True)
            cpu = lambda: session_cpu_s(proc.pid)  # noqa: E731
            asyncio.run(warm_up(url, rank_bodies(rng, 200, args.users, args.queries, args.items, args.candidates, query_of),
                                args.timeout))
            tools = ("ours, varied", "hey") if HEY else ("ours, varied",)
            for repeat in range(1, args.repeats + 1):
                for rate in args.rates:
                    varied = rank_bodies(rng, int(rate * args.duration), args.users, args.queries, args.items,
                                         args.candidates, query_of)
                    for tool in tools if repeat % 2 else tools[::-1]:
                        res = measure(url, tool, rate, args, varied, fixed, body_file, cpu)
                        res.update(repeat=repeat, backend="redis cluster", workers=args.workers, rate=rate, tool=tool)
                        rows.append(res)
                        print(f"  {rate:4.0f}/s {tool:13s} load {res['load']:.2f}: {res['requests']} requests, "
                              f"{res['errors']} errors {res['kinds'] or ''}, p50 {res['p50']:.1f} ms, "
                              f"p99 {res['p99']:.1f} ms", flush=True)
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            cluster.stop()
    text = "\n".join([*head, *notes, f"- hey's body: user {fixed[1]['user']}, query {fixed[1]['query']}", "",
                      *table(rows, args.repeats), ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
