"""The sweeper's structured config, registered as ``hydra/sweeper: optuna``.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module
outside ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = 0
    n_startup_trials: int = 10
    # Independent TPE per parameter is Optuna's default; multivariate models their interactions.
    multivariate: bool = False


@dataclass
class MLflowParentConf:
    """Where the study's parent run lives; ``tracking_uri: null`` turns parent runs off."""

    tracking_uri: Optional[str] = None
    experiment: str = "Default"


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.streamml_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    direction: str = "maximize"
    # Trials this process runs; several processes sharing a study each run their own n_trials.
    n_trials: int = 20
    # Trials asked for at once and handed to the launcher together (its parallelism).
    n_jobs: int = 1
    sampler: Any = field(default_factory=TPESamplerConf)
    # Optuna RDB storage URL: a SQLite file by default, PostgreSQL to share a study across machines.
    storage: Optional[str] = "sqlite:///optuna.db"
    study_name: Optional[str] = None
    load_if_exists: bool = True
    # name -> override grammar: choice(a, b), interval(lo, hi), int(interval(lo, hi)), tag(log, interval(lo, hi)).
    params: dict[str, str] = field(default_factory=dict)
    # param -> {other_param: [values]}: sample param only when other_param took one of the values.
    conditions: dict[str, Any] = field(default_factory=dict)
    mlflow: MLflowParentConf = field(default_factory=MLflowParentConf)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="streamml_optuna_sweeper")
