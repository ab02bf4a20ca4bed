"""The FastAPI app: ``create_app(cfg)`` wires the backend, the model lifecycle and the routers
(:mod:`streamml.serve.routes`, one per resource; their shared needs are :mod:`streamml.serve.deps`).

Routes are ``async`` and do their (short, blocking) backend calls inline: one worker
answers one request at a time, so the online learner and the store connections are
never shared between threads; throughput comes from more worker processes (uvicorn
``workers``), which share the backend. Only model loading runs in a thread, and its
result is swapped in on the event loop.

Errors are JSON ``{"detail": ...}``: 4xx for bad input (nothing is written), 404 for an
unknown query, item or event, 410 for a late reward, 413 for an oversize body, 503 when
the backend fails (counted in ``streamml_store_errors``). Set the environment variable
named by ``auth.token_env`` (default ``STREAMML_TOKEN``) to require
``Authorization: Bearer <token>`` on every route except ``/healthz``, ``/readyz`` and
the static pages (the demo page and the OpenAPI docs, which hold no data); reload and
rollback take the admin token instead (``STREAMML_ADMIN_TOKEN``, :mod:`streamml.serve.deps`).

With ``gc_freeze`` (default), every head load ends with :func:`gc.freeze`: the objects a
worker holds after importing torch and MLflow and loading a head (hundreds of thousands)
move to the collector's permanent generation. Otherwise every full (generation 2)
collection walks them all, stalling every request the worker holds
(figures: ``experiments/serve_stores_figures.md``, ``experiments/serve_benchmark.md``). Frozen objects are still freed by reference
counting; only reference cycles among them (left by a replaced head) are not collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from starlette.exceptions import HTTPException

from streamml.serve import events, metrics
from streamml.serve.deps import Service
from streamml.serve.lifecycle import Lifecycle, bootstrap, check_population
from streamml.serve.routes import model, ops, rank, users

__all__ = ["create_app", "factory"]

log = logging.getLogger("streamml.serve")
CONFIG_ENV = "STREAMML_SERVE_CONFIG"  # how ``python -m streamml.serve`` hands its config to the workers


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (413) and time every request.

    With ``server_timing``, each response carries ``Server-Timing: app;dur=<ms>, pid;desc=<pid>``:
    the time from the request reaching the app to its response headers, and the worker that
    answered, so a load test can tell time spent in the app from time spent queued before it.
    """

    def __init__(self, app, max_bytes: int, server_timing: bool = False):
        self.app, self.max_bytes, self.server_timing = app, int(max_bytes), bool(server_timing)
        self._pid = os.getpid()  # the app is built in each worker process

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        too_big = f"request body is over the limit of {self.max_bytes} bytes"
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and int(length) > self.max_bytes:
                return await JSONResponse({"detail": too_big}, 413)(scope, receive, send)
            received = 0

            async def limited():
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_big)
                return message

            if self.server_timing:
                inner_send = send

                async def send(message):
                    if message["type"] == "http.response.start":
                        dur = f"app;dur={(time.perf_counter() - start) * 1000:.3f}, pid;desc={self._pid}"
                        message = {**message, "headers": [*message.get("headers", []), (b"server-timing", dur.encode())]}
                    await inner_send(message)

            await self.app(scope, limited, send)
        finally:
            route = scope.get("route")
            metrics.LATENCY.labels(getattr(route, "path", "other"), scope["method"]).observe(time.perf_counter() - start)


def _policies(cfg: DictConfig) -> list[tuple[str, float, object]]:
    buckets = [(str(name), float(b.share), instantiate(b.explore)) for name, b in cfg.ab.buckets.items()]
    total = sum(share for _, share, _ in buckets)
    if not buckets or abs(total - 1.0) > 1e-9 or any(share < 0 for _, share, _ in buckets):
        raise ValueError(f"ab.buckets shares must be >= 0 and sum to 1, got {[(n, s) for n, s, _ in buckets]}")
    return buckets


def create_app(cfg: DictConfig, backend=None) -> FastAPI:
    """The service for ``cfg`` (``configs/serve/default.yaml``); ``backend`` overrides ``cfg.backend``."""
    make_learner, population = instantiate(cfg.online), cfg.get("population")
    check_population(make_learner, population)  # before the backend is opened
    backend = instantiate(cfg.backend) if backend is None else backend
    buckets = _policies(cfg)
    service = Service(
        backend=backend,
        lifecycle=Lifecycle(backend, make_learner, cfg.tracking_uri, cfg.experiment, population=population),
        limits=events.Limits(**cfg.limits, **cfg.events),
        policies={name: (policy, repr(policy)) for name, _, policy in buckets},
        shares=[(name, share) for name, share, _ in buckets],
        salt=str(cfg.ab.salt),
        token=os.environ.get(cfg.auth.token_env) or None,
        admin_token=os.environ.get(cfg.auth.get("admin_token_env", "STREAMML_ADMIN_TOKEN")) or None,
        gc_freeze=cfg.get("gc_freeze", True),
    )
    lifecycle = service.lifecycle

    async def follow():  # pick up reloads published by other workers
        while True:
            await asyncio.sleep(cfg.reload.poll_s)
            try:
                record = lifecycle.pending()
                if record is not None:
                    await service.load(record["uri"], publish=False)
                    lifecycle.seen_version = record["version"]
                    log.info("now serving %s (%s)", record["uri"], lifecycle.current.version)
            except Exception as err:  # keep serving the current head; try again at the next poll
                log.warning("could not follow the published model: %s", err)

    async def follow_alias(every_s: float):  # served as models:/name@alias: reload when the alias moves
        while True:
            await asyncio.sleep(every_s)
            try:
                uri = await asyncio.to_thread(lifecycle.alias_moved)
                if uri is not None:
                    await service.load(uri, publish=False)
                    log.info("%s moved: now serving version %s (%s)", uri, lifecycle.current.registry_version,
                             lifecycle.current.version)
            except Exception as err:  # the registry is down or the new version cannot serve: keep the current one
                log.warning("could not follow the registry alias: %s", err)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        uri = await asyncio.to_thread(bootstrap, cfg, backend)
        record = backend.control.get()
        if service.gc_freeze:
            gc.collect()  # once, before serving: what is left is the long-lived heap that load() freezes
        await service.load(uri, publish=False)
        lifecycle.seen_version = record["version"] if record else None
        tasks = [asyncio.create_task(follow())]
        follow_alias_s = float(cfg.reload.get("follow_alias_s", 0) or 0)
        if follow_alias_s > 0:
            tasks.append(asyncio.create_task(follow_alias(follow_alias_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            backend.close()

    app = FastAPI(title="streamml", version="1", lifespan=lifespan,
                  description="Per-user online ranking of short texts: rank, reward, feedback, model lifecycle.")
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes, server_timing=cfg.get("server_timing", False))
    app.state.service, app.state.lifecycle, app.state.backend = service, lifecycle, backend
    for router in (ops.router, rank.router, users.router, model.router):
        app.include_router(router)

    @app.exception_handler(events.ServeError)
    async def _serve_error(request: Request, err: events.ServeError):
        return JSONResponse({"detail": err.detail}, err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        # without the offending input: it may be NaN (not JSON) or a megabyte of floats
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, 422)

    async def _store_error(request: Request, err: Exception):
        metrics.STORE_ERRORS.inc()
        return JSONResponse({"detail": f"the state backend is unavailable: {type(err).__name__}: {err}"}, 503)

    for error in backend.errors:
        app.add_exception_handler(error, _store_error)
    return app


def factory() -> FastAPI:
    """The app of the config that ``python -m streamml.serve`` put in ``STREAMML_SERVE_CONFIG``
    (uvicorn imports it in each worker)."""
    return create_app(OmegaConf.create(os.environ[CONFIG_ENV]))
