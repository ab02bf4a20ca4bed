"""``python -m streamml.loop COMMAND [key=value ...]``: the learning loop's commands.

``export``: the service's event log to Parquet (``configs/loop/export.yaml``, :mod:`streamml.loop.export`).
The command picks the config; the rest of the line is Hydra's, as for ``streamml.train``.
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

COMMANDS = ("export",)


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


@hydra.main(version_base="1.3", config_path="../../configs/loop", config_name="export")
def _export_main(cfg: DictConfig) -> None:
    export(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m streamml.loop {{{','.join(COMMANDS)}}} [key=value ...]; got {argv[:1]}")
    sys.argv = [f"streamml.loop {argv[0]}", *argv[1:]]
    _export_main()


if __name__ == "__main__":
    main()
