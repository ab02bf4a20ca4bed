"""Off-policy evaluation of a challenger head against the champion on the held-out slice of an exported log.

``python -m streamml.loop evaluate log=exports/events challenger=<run id | model URI>`` (``configs/loop/evaluate.yaml``).

**Targets.** A target is a head, loaded from an MLflow model URI as the service loads it
(:func:`streamml.serve.model.load_head`), and a slate policy over its scores (``Greedy`` by
default; any policy with ``marginals(scores, k)``). The champion is ``models:/streamml@champion``,
resolved to the version it points at now, so the evaluation names what it measured. The
per-user residual is not part of a target: it is the head that changes at a promotion (the
validation's ``greedy_head`` target, ``experiments/ope_validation.md``).

**Slates.** Each logged slate of a catalog query is re-ranked over the query's whole catalog
(``items_dir``, the folder the service loaded, whose item ids the log holds): the target's
marginals ``q[i, p]`` over those candidates, with ``k`` the logged slate's length. Slates over
raw candidate vectors (``raw_candidates``) are skipped and counted: the export keeps no vectors
to score them by. The catalog stands for the candidates; a request that named its own subset,
or an item held back because the user had just rejected it, is not in the log.

**Held-out slice.** The latest ``holdout`` fraction of slates by time
(:func:`streamml.loop.logs.split_by_time`); retraining uses the rest, so a challenger is judged
on traffic after the data it learned from, as it would be once promoted.

**Estimators.** :mod:`streamml.loop.ope`; the decision uses ``estimator`` (``dr``, the one the
validation chose: its 95% interval covered the truth in >= 90% of seeds for every target).
DR's reward model is the champion's scores calibrated on the log's training slice
(``reward_model="fitted"``, :class:`streamml.loop.reward_model.PlattRewardModel`), the same for
both targets, so a challenger is not graded by its own beliefs. The slice lies before the
held-out one in time, so the calibration never sees a slate it then estimates on. A ranking
head's raw scale is not a probability, and a confidently wrong champion's ``sigmoid(score)``
would hand DR that champion's self-belief. ``reward_model="champion"`` keeps
``sigmoid(champion score)``, the earlier behaviour. PI is not offered: it needs the logging
policy's joint law over each slate's candidates, which the log does not keep. Intervals are
the bootstrap over users (:func:`streamml.loop.ope.bootstrap_ci`).

**Output.** A table, one row per estimator: the champion's and the challenger's estimates
of accepts per slate with their intervals and the number of slates; printed, written to
``out`` (``evaluation.json`` and ``evaluation.md``), and logged to MLflow as a run of
experiment ``experiment`` tagged with the log's fingerprint (``data_fingerprint``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streamml.loop import ope
from streamml.loop.logs import fingerprint, read_slates, split_by_time
from streamml.loop.reward_model import PlattRewardModel

__all__ = ["Evaluation", "model_uri", "evaluate", "estimate_targets", "fit_reward_model"]

CHAMPION = "models:/streamml@champion"
ESTIMATORS = ("dr", "snips", "ips")
REWARD_MODELS = ("fitted", "champion")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def model_uri(ref: str) -> str:
    """An MLflow run id as ``runs:/<id>/model`` (what ``python -m streamml.train`` logs); a model URI as is.

    >>> model_uri("0123456789abcdef0123456789abcdef"), model_uri("models:/streamml/3")
    ('runs:/0123456789abcdef0123456789abcdef/model', 'models:/streamml/3')
    """
    ref = str(ref).strip()
    if _RUN_ID.match(ref):
        return f"runs:/{ref}/model"
    if ":/" not in ref:
        raise ValueError(f"challenger {ref!r} is neither an MLflow run id (32 hex) nor a model URI "
                         "(runs:/<id>/model, models:/<name>/<version>, models:/<name>@<alias>)")
    return ref


def resolve_version(uri: str, tracking_uri: str | None) -> str:
    """``models:/<name>@<alias>`` as the version it points at now (``models:/<name>/<v>``); other URIs as is."""
    from streamml.serve.model import alias_version, parse_alias

    parsed = parse_alias(uri)
    if parsed is None:
        return uri
    from mlflow.exceptions import MlflowException

    try:
        return f"models:/{parsed[0]}/{alias_version(uri, tracking_uri)}"
    except MlflowException as err:
        raise LookupError(f"{uri}: the registry at {tracking_uri} has no such alias ({err.message.splitlines()[0]}); "
                          "python -m streamml.register sets one") from None


@dataclass
class Evaluation:
    """What ``evaluate`` measured; ``table`` holds one row per estimator."""

    champion: str  # the champion as evaluated: a concrete version URI
    challenger: str
    estimator: str  # the one decisions use
    level: float
    n_slates: int  # held-out slates evaluated
    n_skipped: int  # held-out slates over raw candidate vectors (not evaluated)
    n_users: int
    fingerprint: str
    table: pd.DataFrame = field(repr=False)
    run_id: str | None = None
    reward_model: str = "fitted"  # DR's: fitted on the training slice, or the champion's sigmoid(score)

    def row(self, estimator: str | None = None) -> dict:
        t = self.table.set_index("estimator")
        return {"estimator": estimator or self.estimator, **t.loc[estimator or self.estimator].to_dict()}

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "table"}
        return {**out, "table": self.table.to_dict(orient="records")}

    def markdown(self) -> str:
        pct = f"{100 * self.level:g}%"
        lines = [f"| estimator | champion ({pct} CI) | challenger ({pct} CI) | slates |", "|---|---|---|---|"]
        for r in self.table.itertuples(index=False):
            lines.append(f"| {r.estimator}{' (decides)' if r.estimator == self.estimator else ''} | "
                         f"{r.champion:.3f} [{r.champion_low:.3f}, {r.champion_high:.3f}] | "
                         f"{r.challenger:.3f} [{r.challenger_low:.3f}, {r.challenger_high:.3f}] | {r.n_slates} |")
        return (f"Accepts per slate, held-out slice of {self.n_slates} slates from {self.n_users} users "
                f"(log {self.fingerprint}; {self.n_skipped} raw-candidate slates skipped; DR's reward model: "
                f"{self.reward_model})\n"
                f"champion: {self.champion}\nchallenger: {self.challenger}\n\n" + "\n".join(lines))


def _catalog(items_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """query -> (catalog ids (m,), embeddings (m, D)), as the service loads ``items_dir``."""
    from streamml.stores.events import read_catalog

    c = read_catalog(items_dir)
    queries = np.asarray(c.queries)
    return {q: (c.ids[queries == q], c.X[queries == q]) for q in c.query_ids}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def estimate_targets(slates: pd.DataFrame, heads: dict, catalog: dict, policy=None, estimators=ESTIMATORS,
                     reward_model: str | PlattRewardModel | None = None, level: float = 0.95, n_boot: int = 2000,
                     seed: int = 0, source: str = "the log", reward_head: str = "champion") -> pd.DataFrame:
    """Accepts per slate of each target ``heads[name]`` (a :class:`~streamml.serve.model.Head`) under ``policy``.

    ``slates``: export rows over catalog items; ``catalog``: query -> (ids, X). Returns one row
    per (target, estimator): ``target, estimator, estimate, low, high, n_slates``. DR's reward
    model: a fitted :class:`PlattRewardModel` of ``heads[reward_head]``'s scores, or the name of
    the head whose ``sigmoid(score)`` it is (None: each target its own).
    """
    from streamml.online.policies import Greedy

    policy = Greedy() if policy is None else policy
    if not hasattr(policy, "marginals") or type(policy).__name__ == "Thompson":
        raise ValueError(f"target policy {policy!r} has no marginals over scores (Greedy, EpsilonSlots, PlackettLuce)")
    unknown = sorted(set(slates["query"]) - set(catalog))
    if unknown:
        raise ValueError(f"{source}: query {unknown[0]!r} is not in the catalog (items_dir); it has {sorted(catalog)}")
    for name, head in heads.items():
        missing = sorted(q for q in set(slates["query"]) if not head.has(q))
        if missing:
            raise ValueError(f"the {name} ({head.uri}) has no head for query {missing[0]!r}")
    queries = slates["query"].tolist()
    log = ope.slate_log_from_export(slates, candidates=[catalog[q][0] for q in queries], source=source)
    scores = {name: {q: head.score(q, catalog[q][1]).astype(np.float64) for q in set(queries)}
              for name, head in heads.items()}
    fitted = None  # a fitted reward model's predictions are the same for every target: made once
    if isinstance(reward_model, PlattRewardModel):
        by_query = {q: reward_model.predict(scores[reward_head][q], q) for q in set(queries)}
        fitted = [by_query[q] for q in queries]
    rows = []
    for name in heads:
        cache: dict = {}  # one marginal matrix per (query, k), shared by its slates
        target = [cache.setdefault((q, len(s)), policy.marginals(scores[name][q], len(s))) for q, s in zip(queries, log.shown)]
        rhat = fitted if fitted is not None else [_sigmoid(scores[reward_model or name][q]) for q in queries]
        for est in estimators:
            if est not in ("dr", "snips", "ips"):
                raise ValueError(f"estimator {est!r}: one of dr, snips, ips (PI needs the logging policy's joint law)")
            terms = ope.doubly_robust(log, target, rhat) if est == "dr" else ope.ESTIMATORS[est](log, target)
            value, low, high = ope.bootstrap_ci(terms, log.groups, level=level, n_boot=n_boot, rng=seed)
            rows.append({"target": name, "estimator": est, "estimate": value, "low": low, "high": high,
                         "n_slates": len(log)})
    return pd.DataFrame(rows)


def fit_reward_model(slates: pd.DataFrame, head, catalog: dict, source: str = "the log") -> PlattRewardModel:
    """DR's reward model: ``head``'s scores of the shown items of ``slates`` (export rows; those
    over raw candidates or queries outside ``catalog`` are left out) calibrated on their answers."""
    slates = slates[~slates["raw_candidates"].to_numpy(bool) & slates["query"].isin(list(catalog))]
    slates = slates[[head.has(q) for q in slates["query"]]].reset_index(drop=True)
    if not len(slates):
        raise ValueError(f"{source}: no slate over catalog items to fit DR's reward model on; "
                         "use reward_model=champion, or a smaller holdout")
    queries = slates["query"].tolist()
    log = ope.slate_log_from_export(slates, candidates=[catalog[q][0] for q in queries], source=source)
    scores = {q: head.score(q, catalog[q][1]).astype(np.float64) for q in set(queries)}
    try:
        return PlattRewardModel().fit([scores[q][s] for q, s in zip(queries, log.shown)], queries, log.rewards)
    except ValueError as e:
        raise ValueError(f"{source}: {e}; use reward_model=champion") from None


def evaluate(log: str | Path, challenger: str, champion: str = CHAMPION, *, items_dir: str | Path = "data/queries",
             holdout: float = 0.3, estimator: str = "dr", estimators=ESTIMATORS, policy=None,
             level: float = 0.95, n_boot: int = 2000, seed: int = 0, tracking_uri: str | None = None,
             experiment: str | None = "loop", out: str | Path | None = None, reward_model: str = "fitted") -> Evaluation:
    """OPE of ``challenger`` (run id or model URI) against ``champion`` on the held-out slice of ``log``.

    ``experiment`` None: no MLflow run. ``out``: a folder for ``evaluation.json`` and ``evaluation.md``.
    ``reward_model``: ``fitted`` (the champion's scores calibrated on the training slice) or ``champion``.
    """
    if reward_model not in REWARD_MODELS:
        raise ValueError(f"reward_model must be one of {', '.join(REWARD_MODELS)}, got {reward_model!r}")
    from streamml.register import _check_store, tracking_uri_default
    from streamml.serve.model import load_head

    tracking_uri = tracking_uri or tracking_uri_default()
    estimators = list(dict.fromkeys([estimator, *estimators]))
    challenger_uri = model_uri(challenger)
    _check_store(tracking_uri)  # not a new empty store where one happens to be
    champion_uri = resolve_version(champion, tracking_uri)
    challenger_uri = resolve_version(challenger_uri, tracking_uri)  # an alias: the version measured
    slates = read_slates(log)
    train, held = split_by_time(slates, holdout)
    raw = held["raw_candidates"].to_numpy(bool)
    held = held[~raw].reset_index(drop=True)
    if not len(held):
        raise ValueError(f"{log}: no held-out slate over catalog items to evaluate on ({len(slates)} slates, "
                         f"holdout={holdout}, {int(raw.sum())} over raw candidates)")
    heads = {"champion": load_head(champion_uri, tracking_uri), "challenger": load_head(challenger_uri, tracking_uri)}
    catalog = _catalog(items_dir)
    rm = fit_reward_model(train, heads["champion"], catalog, source=f"{log} (training slice)") \
        if reward_model == "fitted" else "champion"
    est = estimate_targets(held, heads, catalog, policy, estimators, rm, level, n_boot, seed, source=str(log))
    wide = est.pivot(index="estimator", columns="target", values=["estimate", "low", "high"])
    table = pd.DataFrame({"estimator": estimators, **{
        f"{t}{'' if k == 'estimate' else '_' + k}": [float(wide.loc[e, (k, t)]) for e in estimators]
        for t in ("champion", "challenger") for k in ("estimate", "low", "high")}, "n_slates": len(held)})
    result = Evaluation(champion_uri, challenger_uri, estimator, level, len(held), int(raw.sum()),
                        int(held["user"].nunique()), fingerprint(log), table, reward_model=reward_model)
    if experiment:
        result.run_id = _log_run(result, tracking_uri, experiment, log, holdout, policy, n_boot, seed)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(result.to_json(), indent=1))
        (out / "evaluation.md").write_text(result.markdown() + "\n")
    return result


def _log_run(result: Evaluation, tracking_uri: str, experiment: str, log, holdout, policy, n_boot, seed) -> str:
    """An MLflow run of ``experiment``: params, the estimates as metrics, the table; tagged with the log's fingerprint."""
    import mlflow

    from streamml.provenance import git_commit

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    tags = {"data_fingerprint": result.fingerprint, "data_dir": str(log), "git_commit": git_commit(),
            "streamml.role": "evaluate", "champion": result.champion, "challenger": result.challenger}
    run = client.create_run(exp_id, run_name="evaluate", tags=tags)
    rid = run.info.run_id
    params = {"holdout": holdout, "estimator": result.estimator, "policy": repr(policy) if policy else "Greedy()",
              "reward_model": result.reward_model, "level": result.level, "n_boot": n_boot, "seed": seed}
    for key, value in params.items():
        client.log_param(rid, key, str(value))
    for r in result.table.itertuples(index=False):
        for col in ("champion", "champion_low", "champion_high", "challenger", "challenger_low", "challenger_high"):
            client.log_metric(rid, f"{r.estimator}.{col}", float(getattr(r, col)))
    for key in ("n_slates", "n_skipped", "n_users"):
        client.log_metric(rid, key, float(getattr(result, key)))
    client.log_text(rid, json.dumps(result.to_json(), indent=1), "evaluation.json")
    client.log_text(rid, result.markdown() + "\n", "evaluation.md")
    client.set_terminated(rid)
    return rid
