"""``python -m streamml.serve [--config-name serve/redis] [key=value ...]``: start the service.

``main`` composes ``configs/serve/`` and calls :func:`serve` (or :func:`load_items` with
``command=load_items``). ``serve`` fills an empty item catalog, publishes the model to
serve (``model=...``, else the newest finished training run), and runs uvicorn with
``workers`` processes, each building the app from the same config.
"""

from __future__ import annotations

import gc
import os
import tempfile

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


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


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from streamml.serve.app import CONFIG_ENV
    from streamml.serve.lifecycle import bootstrap, check_population

    check_port_free(cfg.host, cfg.port)
    if cfg.get("population"):  # fail here, naming the file and row, rather than in every worker
        from streamml.online.replay import read_log

        check_population(instantiate(cfg.online), cfg.population)
        read_log(cfg.population)
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
    if cfg.command == "load_items":
        load_items(cfg)
    elif cfg.command == "serve":
        serve(cfg)
    else:
        raise ValueError(f"command must be 'serve' or 'load_items', got {cfg.command!r}")


if __name__ == "__main__":
    main()
