"""``python -m streamml.loop COMMAND [key=value ...]``: the learning loop's commands.

``export``: the service's event log to Parquet (``configs/loop/export.yaml``, :mod:`streamml.loop.export`).
``evaluate``: OPE of a challenger against the champion on the log's held-out slice
(``configs/loop/evaluate.yaml``, :mod:`streamml.loop.evaluate`).
``promote``: evaluate, then move the registry alias ``champion`` if the challenger is better;
exits 3 when it does not (``configs/loop/promote.yaml``, :mod:`streamml.loop.promote`).
``rollback``: swap the aliases ``champion`` and ``previous`` back (``configs/loop/promote.yaml``).
``retrain``: a head trained from the exported log (``configs/loop/retrain.yaml``, :mod:`streamml.loop.retrain`).
``migrate``: every user's state re-solved against a new head from the log, in this process or on
Dask (``configs/loop/migrate.yaml``, :mod:`streamml.loop.migrate`, :mod:`streamml.loop.partitions`).
The command picks the config; the rest of the line is Hydra's, as for ``streamml.train``.
An expected failure (a missing log, an unknown run or alias) is one line on stderr and exit 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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


def _evaluate_kwargs(cfg: DictConfig) -> dict:
    return dict(items_dir=cfg.items_dir, holdout=cfg.holdout, estimator=cfg.estimator, estimators=list(cfg.estimators),
                policy=instantiate(cfg.policy), level=cfg.level, n_boot=cfg.n_boot, seed=cfg.seed,
                experiment=cfg.mlflow_experiment, out=cfg.out, reward_model=cfg.reward_model)


def evaluate(cfg: DictConfig):
    """Evaluate ``cfg.challenger`` against ``cfg.champion`` (``configs/loop/evaluate.yaml``); prints the table."""
    from streamml.loop.evaluate import evaluate as run

    result = run(cfg.log, cfg.challenger, cfg.champion, tracking_uri=cfg.tracking_uri, **_evaluate_kwargs(cfg))
    print(result.markdown())
    if result.run_id:
        print(f"MLflow run {result.run_id} (experiment {cfg.mlflow_experiment!r}, {cfg.tracking_uri})")
    return result


def promote(cfg: DictConfig):
    """Evaluate and promote (``configs/loop/promote.yaml``); exits 3 when not promoted."""
    from streamml.loop.promote import NOT_PROMOTED
    from streamml.loop.promote import promote as run

    if not cfg.challenger:
        raise ValueError("promote needs challenger=<run id | model URI>")
    decision = run(cfg.log, cfg.challenger, cfg.name, cfg.alias, cfg.previous_alias, tracking_uri=cfg.tracking_uri,
                   **_evaluate_kwargs(cfg))
    print(decision.evaluation.markdown())
    print(decision.message)
    if not decision.promoted:
        sys.exit(NOT_PROMOTED)
    return decision


def rollback(cfg: DictConfig):
    """Swap ``champion`` and ``previous`` (``configs/loop/promote.yaml``)."""
    from streamml.loop.promote import rollback as run

    champion, previous = run(cfg.name, cfg.alias, cfg.previous_alias, tracking_uri=cfg.tracking_uri)
    print(f"rolled back: {cfg.name}@{cfg.alias} -> version {champion} (version {previous} is @{cfg.previous_alias})")
    return champion, previous


def retrain(cfg: DictConfig) -> dict:
    """Train a head from the exported log (``configs/loop/retrain.yaml``); returns its metrics and run id."""
    from streamml.loop.retrain import retrain as run

    return run(cfg)


def migrate(cfg: DictConfig) -> dict:
    """Re-solve every user's state against the head ``cfg.model`` from the log ``cfg.log``
    (on Dask when ``dask.scheduler`` is set: ``local`` or a scheduler address)."""
    if cfg.dask.scheduler:
        from streamml.loop.partitions import migrate_by_user

        result = migrate_by_user(cfg, cfg.dask.scheduler, cfg.dask.n_workers)
        print(f"migrated {result['users']} users' states ({result['events']} logged rewards) on Dask ({cfg.dask.scheduler})")
        return result
    from streamml.loop.migrate import run

    return run(cfg)


CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")  # absolute: main() also runs in-process (tests)
COMMANDS = {  # name: (config, function of the composed config); adding a command is one line
    "export": ("loop/export", export),
    "evaluate": ("loop/evaluate", evaluate),
    "promote": ("loop/promote", promote),
    "rollback": ("loop/promote", rollback),
    "retrain": ("loop/retrain", retrain),
    "migrate": ("loop/migrate", migrate),
}


def _one_line_errors(fn):
    def run(cfg: DictConfig):
        if "tracking_uri" in cfg:
            import mlflow  # noqa: F401  (its import sets its loggers' levels: quiet them after)

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
        try:
            return fn(cfg)
        except (LookupError, ValueError, OSError) as err:  # expected: say what, not where
            raise SystemExit(f"error: {err}") from None

    return run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m streamml.loop {{{','.join(COMMANDS)}}} [key=value ...]; got {argv[:1]}")
    config, fn = COMMANDS[argv[0]]
    sys.argv = [f"streamml.loop {argv[0]}", *argv[1:]]
    hydra.main(version_base="1.3", config_path=CONFIGS, config_name=config)(_one_line_errors(fn))()


if __name__ == "__main__":
    main()
