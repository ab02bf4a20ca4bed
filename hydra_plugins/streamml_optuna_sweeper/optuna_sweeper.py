"""Optuna study driven through a Hydra launcher, by ask and tell.

Each round asks the study for ``n_jobs`` trials, turns their parameters into Hydra overrides,
hands the batch to the configured launcher (basic, joblib, submitit, ...) and tells the
study each job's return value. The study lives in Optuna's RDB storage, so several sweep
processes on several machines can share one study: trial numbers come from the storage,
and each process runs its own ``n_trials``. A job that raises or returns a non-finite or
non-numeric value is told FAIL and the study goes on.

Every trial gets ``++optuna.study=NAME ++optuna.trial=NUMBER`` so the task can tag its
record. With ``mlflow.tracking_uri`` set, the process that creates the study also
creates the study's parent run in MLflow (``streamml.tracking.study_run``); processes that
join an existing study find it by tag.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

try:
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
except ImportError:  # the `search` extra is missing
    # Hydra imports every plugin module at start-up, for every run; a failing import here would
    # print its "incompatible or buggy plugin" warning on each plain `python -m streamml.train`.
    # The sweeper says what to install when a search actually selects it (OptunaSweeper below).
    optuna = None

log = logging.getLogger(__name__)
MISSING_OPTUNA = "the Optuna sweeper (hparams_search=...) needs Optuna: pip install -e '.[search]'"


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override in Hydra's grammar.

    ``choice(a, b)`` and ``a,b`` are categorical; ``interval(lo, hi)`` is uniform over floats
    unless both ends are ints (``int(interval(lo, hi))``); ``tag(log, ...)`` samples on a log
    scale; ``range(lo, hi, step)`` is a stepped int or float range (``hi`` excluded).
    """
    if not override.is_sweep_override():
        raise ValueError(f"'{override.input_line}' is not a sweep; use choice(...), interval(...) or range(...)")
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    log_scale = "log" in getattr(value, "tags", set())
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            # Optuna's float step includes ``high``; Hydra's range excludes ``stop``.
            high = value.start + value.step * (math.ceil((value.stop - value.start) / value.step) - 1)
            return FloatDistribution(value.start, high, step=value.step, log=log_scale)
        return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step), log=log_scale)
    raise ValueError(f"'{override.input_line}': the Optuna sweeper does not support this sweep")


def search_space(overrides: list[Override]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Split parsed overrides into the search space (name -> distribution) and fixed overrides."""
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for override in overrides:
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(f"{override.get_key_element()}={override.get_value_element_as_str()}")
    return space, fixed


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution], conditions: dict[str, dict[str, list]]) -> dict[str, Any]:
    """Sample the trial's parameters in order, skipping those whose condition is unmet.

    ``conditions`` maps a parameter to ``{other_parameter: [values]}``: it is sampled only
    when every named parameter took one of the listed values (``learner.head.hidden`` only
    for ``learner=mlp``), so TPE never models a setting the trial does not use.
    """
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if any(params.get(other) not in values for other, values in conditions.get(name, {}).items()):
            continue
        if isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return params


def check_conditions(space: dict[str, BaseDistribution], conditions: dict[str, dict[str, list]]) -> None:
    names = list(space)
    for name, condition in conditions.items():
        if name not in space:
            raise ValueError(f"hydra.sweeper.conditions names '{name}', which is not a searched parameter ({names})")
        for other in condition:
            if other not in space or names.index(other) > names.index(name):
                raise ValueError(f"hydra.sweeper.conditions['{name}'] depends on '{other}', which must be a searched "
                                 f"parameter listed before it ({names})")


def _encode(value: Any) -> str:
    return Override._get_value_element_as_str(value)


def safe_url(url: str | None) -> str | None:
    """The storage URL with any password masked, for logs and result files."""
    if not url or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def trial_value(job_return) -> float | None:
    """The job's objective as a float, or None (logged) when the job failed or returned junk."""
    try:
        value = job_return.return_value  # re-raises the job's exception
    except Exception as e:  # noqa: BLE001 - any error in a trial fails that trial only
        log.warning(f"trial job failed: {type(e).__name__}: {e}")
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        log.warning(f"trial job returned {value!r}, not a number")
        return None
    if not math.isfinite(value):
        log.warning(f"trial job returned {value}")
        return None
    return value


def open_storage(url: str | None, attempts: int = 5):
    """Optuna's RDB storage at ``url`` (None: in memory), retrying its schema creation.

    Two processes opening a fresh PostgreSQL database at once race to create the same
    tables and types; the loser fails with an integrity error, and a retry finds them made.
    """
    if url is None:
        return None
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise
            log.info(f"opening Optuna storage {safe_url(url)} failed ({type(e).__name__}); retrying")
            time.sleep(0.5 * (attempt + 1))


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, sampler: Any, storage: str | None,
                 study_name: str | None, load_if_exists: bool, params: dict[str, str] | None, mlflow: Any,
                 conditions: Any = None) -> None:
        if optuna is None:
            raise ImportError(MISSING_OPTUNA)
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction must be 'minimize' or 'maximize'; got {direction!r}")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials and n_jobs must be >= 1; got n_trials={n_trials}, n_jobs={n_jobs}")
        self.direction, self.n_trials, self.n_jobs = direction, int(n_trials), int(n_jobs)
        self.sampler_conf, self.storage, self.study_name = sampler, storage, study_name
        self.load_if_exists, self.params = load_if_exists, dict(params or {})
        self.mlflow = mlflow
        self.conditions = {k: {o: list(v) for o, v in c.items()} for k, c in (conditions or {}).items()}
        self.launcher = None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context, task_function=task_function, config=config)

    def _study(self) -> tuple[optuna.Study, bool]:
        """Create the study, or load it when another process (or an earlier sweep) made it first."""
        sampler = self.sampler_conf  # Hydra instantiates it with the sweeper; a plain config still works
        if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
            sampler = instantiate(sampler)
        kwargs = dict(storage=open_storage(self.storage), sampler=sampler, study_name=self.study_name)
        try:
            return optuna.create_study(direction=self.direction, load_if_exists=False, **kwargs), True
        except optuna.exceptions.DuplicatedStudyError:
            if not self.load_if_exists:
                raise ValueError(f"Optuna study '{self.study_name}' already exists in {self.storage}; "
                                 "set hydra.sweeper.load_if_exists=true to add trials to it, or choose another study_name") from None
        study = optuna.load_study(**kwargs)
        if study.direction.name.lower() != self.direction:
            raise ValueError(f"Optuna study '{self.study_name}' maximises/minimises differently "
                             f"({study.direction.name.lower()}) from hydra.sweeper.direction={self.direction}")
        return study, False

    def _parent_run(self, study: optuna.Study, created: bool) -> str | None:
        if not self.mlflow or not self.mlflow.get("tracking_uri"):
            return None
        from streamml import tracking

        # A joining process waits a little for the creator to make the parent run.
        return tracking.study_run(self.mlflow.tracking_uri, self.mlflow.experiment, study.study_name,
                                  create=True, wait_s=0.0 if created else 30.0)

    def sweep(self, arguments: list[str]) -> list:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space, fixed = search_space(overrides)
        if not space:
            raise ValueError("the Optuna sweeper has nothing to search: set hydra.sweeper.params or pass name=choice(...)/interval(...)")
        check_conditions(space, self.conditions)
        study, created = self._study()
        parent = self._parent_run(study, created)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(f"Optuna study '{study.study_name}' in {safe_url(self.storage)}: {self.n_trials} trials, {self.n_jobs} at a time"
                 + (f", MLflow parent run {parent}" if parent else ""))
        returns, job_idx, failed = [], 0, 0
        while job_idx < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - job_idx))]
            batch = [fixed + [f"{k}={_encode(v)}" for k, v in suggest(t, space, self.conditions).items()]
                     + [f"++optuna.study={_encode(study.study_name)}", f"++optuna.trial={t.number}"] for t in trials]
            try:
                self.validate_batch_is_legal(batch)
            except Exception:
                for t in trials:
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
                raise
            results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for t, result in zip(trials, results):
                value = trial_value(result)
                if value is None:
                    failed += 1
                    study.tell(t, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(t, value)
            returns.extend(results)
            job_idx += len(trials)
        self._finish(study, parent, sweep_dir, failed)
        return returns

    def _finish(self, study: optuna.Study, parent: str | None, sweep_dir: Path, failed: int) -> None:
        try:
            best = study.best_trial
        except ValueError:
            log.warning(f"Optuna study '{study.study_name}': no trial completed ({failed} failed)")
            return
        results = {"study_name": study.study_name, "storage": safe_url(self.storage), "direction": self.direction,
                   "best_trial": best.number, "best_value": best.value, "best_params": best.params,
                   "failed_trials_this_process": failed}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info(f"best trial {best.number}: {self.direction[:3]} value {best.value} with {best.params}")
        if parent:
            from streamml import tracking

            tracking.finish_study_run(self.mlflow.tracking_uri, parent, study)
