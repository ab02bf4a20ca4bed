"""Rank latency of the service measured by two load tools side by side: ours and ``hey``.

For each backend (SQLite, Redis) the script starts ``python -m streamml.serve`` with ``--workers``
uvicorn workers on ``--port`` (default: a free one) over the synthetic catalog of
``experiments/bench_serve.py``, then, for each rate, sends POST /v1/rank (100 catalog candidates,
k=10) three ways, each for ``--duration`` seconds against the same running service:

- ``ours, varied``: our open-loop generator (``bench_serve.open_loop``), a new random user, query
  and candidate set per request (what ``bench_serve.py`` sends);
- ``ours, one body``: our generator sending the one body ``hey`` sends;
- ``hey``: ``hey -z DURATION -c C -q RATE/C -m POST -T application/json -D body.json`` (Debian's
  ``hey``; ``-q`` is per worker, so the rate is ``C * q``). Its p50, p99, request and error counts
  are read from its own summary (:func:`parse_hey`), not recomputed.

What the two tools count differs. Ours is open loop: request i is due at ``t0 + i / rate``, is sent
then whether or not earlier ones have answered, and its latency counts from when it was due. ``hey``
is closed loop per worker: each of its C workers waits for a tick of its own ``1/q`` ticker, sends,
and waits for the answer before it can take the next tick (a tick missed meanwhile is dropped);
latency counts from the send. So a stall of the service shows in ours as the latency of every
request due during it, and in ``hey`` only as the latency of the C requests in flight (the requests
it would have sent meanwhile are not sent). And ``hey``'s C workers start together, so they send C
requests at once every ``1/q`` s, where ours spreads them evenly.

Before each cell the script waits until the service is idle (its CPU under 10 % of a core for
0.5 s, at most 60 s), so a cell does not inherit requests the previous one left queued in the
service after the client gave up on them. Every cell records the 1-minute load average just before it, the service's CPU per request (its
processes, not Redis) and the load generator's (ours: this process; ``hey``: the child's rusage).
``--repeats`` starts a fresh service per repeat; the order of the tools rotates between repeats.

    python experiments/bench_serve_hey.py --duration 8 --repeats 3 --out two_tools.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from bench_serve import Redis, make_catalog, open_loop, own_cpu_s, session_cpu_s, start_service  # noqa: E402

from streamml.provenance import git_commit, machine  # noqa: E402

HEY = shutil.which("hey")
TOOLS = ("ours, varied", "ours, one body", "hey")


def parse_hey(text: str) -> dict:
    """The figures of ``hey``'s summary: requests (answers + errors), errors (non-200 answers +
    failed requests), error kinds, requests/s, and the p50 / p99 it prints (ms; NaN when it prints
    none: hey 0.1.4 leaves a percentile out, printing ``0% in 0.0000 secs``, when it has fewer
    than 100 answers)."""
    pct = {int(p): float(s) * 1000 for p, s in re.findall(r"^\s*(\d+)% in ([\d.]+) secs", text, re.M) if int(p) > 0}
    statuses = {int(c): int(n) for c, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", text, re.M)}
    errors = Counter()
    if "Error distribution:" in text:
        for n, what in re.findall(r"^\s*\[(\d+)\]\s+(.+)$", text.split("Error distribution:", 1)[1], re.M):
            errors["timeout" if "Timeout" in what or "deadline" in what else what.rsplit(": ", 1)[-1]] += int(n)
    for code, n in statuses.items():
        if code != 200:
            errors[str(code)] += n
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    failed = sum(n for k, n in errors.items() if not k.isdigit())
    return {"requests": sum(statuses.values()) + failed, "errors": sum(errors.values()), "kinds": dict(errors),
            "rps": float(rps.group(1)) if rps else float("nan"),
            "p50": pct.get(50, float("nan")), "p99": pct.get(99, float("nan"))}


def hey_rate(rate: float, concurrency: int) -> tuple[int, int]:
    """(C, q) with C * q = rate: hey's ``-q`` is an integer rate per worker."""
    q = round(rate / concurrency)
    if q * concurrency != rate:
        raise ValueError(f"rate {rate} is not {concurrency} workers x an integer rate")
    return concurrency, q


def run_hey(url: str, body: Path, rate: float, duration: float, concurrency: int, timeout: float) -> dict:
    c, q = hey_rate(rate, concurrency)
    cmd = [HEY, "-z", f"{duration:g}s", "-c", str(c), "-q", str(q), "-t", str(max(1, round(timeout))), "-m", "POST",
           "-T", "application/json", "-D", str(body), url + "/v1/rank"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = parse_hey(out)
    res["client_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["raw"] = out
    return res


async def warm_up(url: str, bodies: list, timeout: float) -> None:
    """Every worker compiles and fills caches on its first requests: 2 s at 100 req/s, not measured."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await open_loop(session, url, bodies, 100, 2.0, timeout)


async def run_ours(url: str, bodies: list, rate: float, duration: float, timeout: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        k0 = own_cpu_s()
        lat, errors, _, _ = await open_loop(session, url, bodies, rate, duration, timeout)
        k1 = own_cpu_s()
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"),) * 2
    n = min(len(bodies), int(rate * duration))
    return {"requests": n, "errors": sum(errors.values()), "kinds": dict(errors), "rps": float("nan"),
            "p50": float(p50), "p99": float(p99), "client_s": k1 - k0}


def rank_bodies(rng, n: int, users: int, queries: int, items: int, candidates: int, query_of=None) -> list:
    """``n`` rank requests: a user ``user<u>`` drawn from ``users``, a random query (or
    ``query_of(u)``), and ``candidates`` distinct items of that query's catalog."""
    out = []
    for _ in range(n):
        u = int(rng.integers(0, users))
        q = int(rng.integers(0, queries)) if query_of is None else query_of(u)
        cands = (q * items + rng.choice(items, candidates, replace=False)).tolist()
        out.append(("/v1/rank", {"user": f"user{u}", "query": f"q{q:02d}", "k": 10, "items": cands}))
    return out


def settle(cpu, idle_cpu_s: float = 0.05, window_s: float = 0.5, max_s: float = 60.0) -> float:
    """Wait until the service is idle: ``cpu()`` grows by less than ``idle_cpu_s`` over ``window_s``.
    A cell the service could not keep up with leaves requests queued in it after the client gave
    up on them, and the next cell must not inherit them. Returns the seconds waited (``max_s`` at most)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = cpu()
        time.sleep(window_s)
        if cpu() - c0 < idle_cpu_s:
            break
    return time.monotonic() - t0


def measure(url: str, tool: str, rate: float, args, varied: list, fixed: tuple, body_file: Path, cpu) -> dict:
    """One cell: ``tool`` at ``rate`` against the running service at ``url``, once it is idle."""
    settled = settle(cpu)
    load = os.getloadavg()[0]
    c0 = cpu()
    if tool == "hey":
        res = run_hey(url, body_file, rate, args.duration, args.hey_concurrency, args.timeout)
    else:
        bodies = varied if tool == "ours, varied" else [fixed] * len(varied)
        res = asyncio.run(run_ours(url, bodies, rate, args.duration, args.timeout))
    res["service_ms"] = (cpu() - c0) / max(res["requests"], 1) * 1000
    res["client_ms"] = res["client_s"] / max(res["requests"], 1) * 1000
    res["load"], res["settled_s"] = load, settled
    return res


def table(rows: list[dict], repeats: int) -> list[str]:
    """The median over repeats of each (backend, workers, rate, tool), each repeat's p99 listed."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["backend"], r["workers"], r["rate"], r["tool"]), []).append(r)
    out = [f"Over {repeats} repeat(s): requests and errors summed; p50, p99 and CPU per request the median of the "
           "repeats' (each repeat's p99 listed); load average (1 min) just before each repeat's cell.", "",
           "| backend | workers | rate (req/s) | tool | requests | errors | p50 (ms) | p99 (ms) | p99 of each repeat (ms) "
           "| CPU/request, service (ms) | CPU/request, load generator (ms) | load average before each cell "
           "| wait for an idle service before each cell (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (b, w, rate, tool), runs in cells.items():
        med = lambda k: float(np.median([x[k] for x in runs]))  # noqa: E731
        kinds = Counter()
        for x in runs:
            kinds.update(x["kinds"])
        errors = f"{sum(x['errors'] for x in runs)}" + (f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())})" if kinds else "")
        out.append(f"| {b} | {w} | {rate:.0f} | {tool} | {sum(x['requests'] for x in runs)} | {errors} | {med('p50'):.1f} "
                   f"| {med('p99'):.1f} | {', '.join('%.1f' % x['p99'] for x in runs)} | {med('service_ms'):.2f} "
                   f"| {med('client_ms'):.2f} | {', '.join('%.2f' % x['load'] for x in runs)} "
                   f"| {', '.join('%.1f' % x['settled_s'] for x in runs)} |")
    return out


def header(args, argv, script: str) -> list[str]:
    command = f"python experiments/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    hey_version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True).stdout
    return [f"- command: `{command.strip()}`", f"- commit: {git_commit(short=True, cwd=REPO)}", f"- machine: {machine()}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- hey: Debian package {hey_version or '?'} ({HEY}), `-c {args.hey_concurrency}`"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["sqlite", "redis"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rates", nargs="+", type=float, default=[100, 300])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--items", type=int, default=200, help="catalog items per query")
    p.add_argument("--users", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as an error")
    p.add_argument("--hey-concurrency", type=int, default=2, help="hey's -c (its -q is then rate / c)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--port", type=int, default=None, help="the service's port (default: a free one)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--hey-output", type=Path, default=None, help="folder for hey's own summary of every cell")
    args = p.parse_args(argv)
    if HEY is None:
        p.error("hey is not installed (apt-get install hey)")
    for rate in args.rates:
        hey_rate(rate, args.hey_concurrency)
    head = header(args, argv, "bench_serve_hey.py")
    rng = np.random.default_rng(0)
    fixed = rank_bodies(np.random.default_rng(1), 1, args.users, args.queries, args.items, args.candidates)[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hey-") as tmp:
        root = Path(tmp)
        body_file = root / "rank.json"
        body_file.write_text(json.dumps(fixed[1]))
        print("building the catalog and the head ...", flush=True)
        items, tracking_uri = make_catalog(root, args.queries, args.items)
        gc.collect()
        gc.freeze()  # as bench_serve.py: keep full collections of this generator off the catalog builder's heap
        redis = Redis(root) if "redis" in args.backends else None
        try:
            for repeat in range(1, args.repeats + 1):
                for backend in args.backends:
                    print(f"repeat {repeat}: starting the service: {backend}, {args.workers} worker(s) ...", flush=True)
                    proc, url = start_service(root, backend, args.workers, items, tracking_uri, redis and redis.port,
                                              name=f"hey{repeat}", port=args.port)
                    if args.port and not url.endswith(f":{args.port}"):
                        raise RuntimeError(f"the service is at {url}, not on --port {args.port}")
                    try:
                        asyncio.run(warm_up(url, rank_bodies(rng, 200, args.users, args.queries, args.items,
                                                             args.candidates), args.timeout))
                        for rate in args.rates:
                            n = int(rate * args.duration)
                            varied = rank_bodies(rng, n, args.users, args.queries, args.items, args.candidates)
                            order = TOOLS[(repeat - 1) % 3:] + TOOLS[:(repeat - 1) % 3]
                            for tool in order:
                                res = measure(url, tool, rate, args, varied, fixed, body_file, lambda: session_cpu_s(proc.pid))
                                res.update(repeat=repeat, backend=backend, workers=args.workers, rate=rate, tool=tool)
                                rows.append(res)
                                if args.hey_output and tool == "hey":
                                    args.hey_output.mkdir(parents=True, exist_ok=True)
                                    (args.hey_output / f"{repeat}-{backend}-{rate:.0f}.txt").write_text(res["raw"])
                                print(f"  {backend:6s} {rate:4.0f}/s {tool:15s} load {res['load']:.2f}, idle after "
                                      f"{res['settled_s']:.1f} s: {res['requests']} "
                                      f"requests, {res['errors']} errors {res['kinds'] or ''}, p50 {res['p50']:.1f} ms, "
                                      f"p99 {res['p99']:.1f} ms, CPU/request service {res['service_ms']:.2f} ms, "
                                      f"generator {res['client_ms']:.2f} ms", flush=True)
                    finally:
                        os.killpg(proc.pid, signal.SIGTERM)
                        proc.wait(30)
        finally:
            if redis:
                head.append(f"- Redis persistence at the end (appendfsync everysec, no snapshots): {redis.persistence()}")
                redis.stop()
    head.append(f"- the one body (ours, one body; hey): `{json.dumps(fixed[1])[:120]}...` "
                f"({len(json.dumps(fixed[1]))} bytes)")
    text = "\n".join([*head, "", *table(rows, args.repeats), ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
