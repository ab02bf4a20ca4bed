"""``python -m streamml.loop COMMAND [key=value ...]``: the learning loop's commands.

Each command is one config of ``configs/loop/`` and one function; the rest of the line is
Hydra's, as for ``streamml.train``:

- ``export``: the service's event log to Parquet (``loop/export.yaml``, :mod:`streamml.loop.export`);
- ``retrain``: a head trained from the exported log (``loop/retrain.yaml``, :mod:`streamml.loop.retrain`);
- ``migrate``: every user's state re-solved against a new head from the log (``loop/migrate.yaml``,
  :mod:`streamml.loop.migrate`).
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig


def export(cfg: DictConfig) -> dict:
    """Run one export with ``cfg`` (a composed ``configs/loop/export.yaml``); returns the export state."""
    from streamml.loop.export import export as run

    source = instantiate(cfg.source)
    try:
        state = run(source, cfg.out, chunk=cfg.chunk, settle_s=cfg.settle_s, max_chunks=cfg.max_chunks,
                    progress=cfg.progress)
    finally:
        source.close()
    print(f"exported {state['rows']} events in {state['chunks']} chunks to {cfg.out}")
    return state


def retrain(cfg: DictConfig) -> dict:
    """Train a head from the exported log (``configs/loop/retrain.yaml``); returns its metrics and run id."""
    from streamml.loop.retrain import retrain as run

    return run(cfg)


def migrate(cfg: DictConfig) -> dict:
    """Re-solve every user's state against the head ``cfg.model`` from the log ``cfg.log``."""
    from streamml.loop.migrate import run

    return run(cfg)


COMMANDS = {"export": ("loop/export", export), "retrain": ("loop/retrain", retrain),  # name: (config, function)
            "migrate": ("loop/migrate", migrate)}  # name: (config, function)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m streamml.loop {{{','.join(COMMANDS)}}} [key=value ...]; got {argv[:1]}")
    config, fn = COMMANDS[argv[0]]
    sys.argv = [f"streamml.loop {argv[0]}", *argv[1:]]
    hydra.main(version_base="1.3", config_path="../../configs", config_name=config)(fn)()


if __name__ == "__main__":
    main()
