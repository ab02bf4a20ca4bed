"""``python -m streamml.serve [--config-name serve/redis] [key=value ...]``: start the service.

``main`` composes ``configs/serve/`` and calls :func:`serve` (or :func:`load_items` with
``command=load_items``). ``serve`` fills an empty item catalog, publishes the model to
serve (``model=...``, else the newest finished training run), and runs uvicorn with
``workers`` processes, each building the app from the same config.

It fails fast, before any worker starts: on a taken port before loading anything, and on a
model URI with no model behind it before publishing it. A failure at start prints one line
on stderr and exits 1; the traceback goes to ``outputs/serve.log``.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from unittest import mock

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from streamml.cli import one_line_failure

LOG_FILE = Path("outputs") / "serve.log"


def load_items(cfg: DictConfig) -> int:
    """Load ``cfg.items_dir`` into the backend's item catalog; returns the number of items."""
    backend = instantiate(cfg.backend)
    try:
        n = backend.catalog.load_folder(cfg.items_dir)
        print(f"loaded {n} items of {len(backend.catalog.queries())} queries from {cfg.items_dir}")
        return n
    finally:
        backend.close()


def check_port_free(host: str, port: int) -> None:
    """Fail at once, naming the address, if ``host:port`` is taken: loading the model takes
    seconds, after which uvicorn would only log "address already in use" and exit."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, int(port)))
        except OSError as err:
            raise SystemExit(f"cannot serve on {host}:{port}: {err.strerror}; choose another with port=...") from None


class ModelNotFound(LookupError):
    """The configured model URI names no MLflow model."""


def check_model(model: str | None, tracking_uri: str, experiment: str) -> str:
    """The URI to serve (``model``, else the newest finished run's), once MLflow shows a model
    there. Reads the model's ``MLmodel`` file only: without this, a bad URI is published to the
    backend and every worker fails at start with a long traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from streamml.serve.model import resolve_model_uri

    uri = resolve_model_uri(model, tracking_uri, experiment)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):  # no bar for one small file
            mlflow.models.get_model_info(uri)
    except MlflowException as err:
        hint = (" (register one: python -m streamml.register RUN_ID --alias ALIAS)" if uri.startswith("models:/")
                else " (python -m streamml.train logs one; mlflow ui lists the runs)")
        raise ModelNotFound(f"no MLflow model at {uri} in {tracking_uri}: {str(err).splitlines()[0]}{hint}") from err
    return uri


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from streamml.serve.app import CONFIG_ENV
    from streamml.serve.lifecycle import bootstrap, check_population

    check_port_free(cfg.host, cfg.port)
    if cfg.get("population"):  # fail here, naming the file and row, rather than in every worker
        from streamml.online.replay import read_log

        check_population(instantiate(cfg.online), cfg.population)
        read_log(cfg.population)
    check_model(cfg.model, cfg.tracking_uri, cfg.experiment)
    backend = instantiate(cfg.backend)
    try:
        uri = bootstrap(cfg, backend, publish=True)
    finally:
        backend.close()
    if cfg.workers > 1 and cfg.get("gc_freeze", True):
        # this process only supervises the workers now: keep its full collections off the heap
        # it built (hydra, torch, mlflow), or each one burns CPU the workers need
        gc.collect()
        gc.freeze()
    print(f"serving {uri} on http://{cfg.host}:{cfg.port} with {cfg.workers} worker(s)")
    os.environ[CONFIG_ENV] = OmegaConf.to_yaml(cfg, resolve=True)
    if cfg.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="streamml-metrics-")
    uvicorn.run("streamml.serve.app:factory", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level=cfg.log_level)


@hydra.main(version_base="1.3", config_path="../../configs", config_name="serve/default")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.command == "load_items":
            load_items(cfg)
        elif cfg.command == "serve":
            serve(cfg)
        else:
            raise ValueError(f"command must be 'serve' or 'load_items', got {cfg.command!r}")
    except Exception as err:  # at start, before any worker: one line for the user, the traceback in the log
        raise SystemExit(one_line_failure(err, LOG_FILE)) from None


if __name__ == "__main__":
    main()
