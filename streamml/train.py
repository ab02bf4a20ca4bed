"""Entry point: ``python -m streamml.train [+experiment=NAME] [-m] [key=value ...]``.

``main`` only composes the config; ``train(cfg)`` runs the config's runner, ``run``, so tests
and notebooks call it directly: offline training by default (``streamml/offline/run.py``:
cross-validation, a final fit and the model in MLflow), or the runner of the experiment's
scenario (the simulator, the replay). It returns the run's metrics; ``main`` returns
``cfg.objective`` for sweepers.

A config that cannot run here (``trainer=gpu`` without a GPU) fails before any data is
loaded or any MLflow run is opened, and a malformed data file before Lightning, MLflow or
the simulator is imported: each with one line naming the cause (file and row), in
seconds, and its traceback in ``train.log``. The run's lines go
through ``logging``, so Hydra writes them to ``train.log`` in the run's output folder as
well as the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import traceback

import hydra
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig

from streamml.data import DataValidationError, load_queries  # numpy and pandas only


class StartupError(RuntimeError):
    """The config cannot run on this machine; raised before any data or MLflow run."""


def check_gpu(cfg: DictConfig) -> None:
    """Fail if the configured accelerator is a GPU that torch does not see (torch alone: fast)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto")) if "trainer" in cfg else "auto"
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        if not (torch.cuda.is_available() or (accelerator != "cuda" and torch.backends.mps.is_available())):
            raise StartupError(
                f"trainer.accelerator={accelerator} but torch sees no GPU on this machine; "
                "use trainer=cpu, or trainer.accelerator=auto to use a GPU only when one is visible")


def check_trainer(cfg: DictConfig) -> None:
    """Fail if the configured accelerator is missing: torch answers for a GPU, then Lightning
    builds the configured ``Trainer`` once, which rejects any other setting the machine lacks."""
    if "trainer" not in cfg:
        return
    check_gpu(cfg)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        instantiate(cfg.trainer)()
    except MisconfigurationException as err:
        raise StartupError(
            f"trainer.accelerator={cfg.trainer.accelerator} cannot run on this machine ({err}); "
            "use trainer=cpu, or trainer.accelerator=auto to use a GPU only when one is visible"
        ) from None


def _quiet_lightning() -> None:
    # Lightning's rank-zero info repeats on every fit: "GPU available: ...", "TPU available: ...",
    # a litlogger advert and "`Trainer.fit` stopped"; its warnings stay visible.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.run`` and return its metrics.

    ``run`` (``configs/train.yaml``) is a dotted function ``run(cfg) -> metrics``: offline
    training (``streamml.offline.run.run``) unless the config has a scenario, whose own ``run``
    it then is (``configs/scenario/*.yaml``: the simulator or the replay). A new scenario names
    its runner there, with no edit here.
    """
    _quiet_lightning()
    check_gpu(cfg)
    # The query files are read and validated before Lightning, MLflow and the runner are imported:
    # a bad file then fails in about a second, naming the file and the row, not after 10-14 s.
    # A run that reads no query files (the replay reads its own log) sets data.dir to null.
    if cfg.data.get("dir") is not None:
        load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    check_trainer(cfg)
    return get_method(cfg.run)(cfg)


class _TeeToLogFiles(io.TextIOBase):
    """``sys.stdout`` that also writes to the log files Hydra opened (``train.log``).

    Some parts print their results (the online benchmark's table) rather than log them;
    without this, ``train.log`` would miss what the console showed.
    """

    def __init__(self, console, files):
        self.console, self.files = console, files

    def write(self, text: str) -> int:
        self.console.write(text)
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        for f in self.files:
            f.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the console's
        return getattr(self.console, name)


def _log_files() -> list:
    """The open streams of the root logger's file handlers (Hydra's ``train.log``); a handler
    closed by an earlier run in the same process has no stream and is left out."""
    return [h.stream for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and h.stream is not None and not h.stream.closed]


@contextlib.contextmanager
def _stdout_to_log():
    files = _log_files()
    if not files:
        yield
        return
    with contextlib.redirect_stdout(_TeeToLogFiles(sys.stdout, files)):
        yield


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        with _stdout_to_log():
            return train(cfg)[cfg.objective]
    except (StartupError, DataValidationError, FileNotFoundError) as err:
        # the user's input, not a bug: one line on the console, the traceback in train.log
        for stream in _log_files():
            stream.write(traceback.format_exc())
            stream.flush()
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
