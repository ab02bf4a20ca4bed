"""The online benchmark: every learner against the same simulated users, predicting before learning.

Learners are built by factories ``factory(items, item_query, head_scores) -> learner`` over
the world's catalog (see :mod:`streamml.online.scenarios`), and follow the online contract
(``score``/``rank``/``learn_one``/``learn_many``/``forget``). Two protocols:

* :func:`interact` (``personalize``, ``large_catalog``): each round the learner scores the
  user's pool items not shown yet, the policy shows ``k`` of them, the user answers, the
  learner learns from those answers. After each round we record the learner's **probe
  AUC**: the AUC of its scores on the user's probe items (never shown, the same for every
  learner) against the user's truth; and the accepts of the slate. Checkpoints 5, 10, 20
  and 40 events read the probe AUC after that many answers; ``cumulative_accepts_per_slate``
  is the user's view: accepts over every slate shown.
* :func:`coldstart` (no head): one pass over each query's items per random order; the
  prequential AUC is the AUC of the scores given before each label (river's progressive
  validation).

Every learner meets the same users, pools, probes, truths and policy random streams (one
generator per user, seeded by the user's index), so differences come from the learners.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from streamml.online.policies import policy_scores
from streamml.online.scenarios import World, coldstart_streams, large_catalog, real_users, stream_seed

CHECKPOINTS = (5, 10, 20, 40)


def _auc(truth: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(truth, scores))


def interact(world: World, learners: dict, policy, k: int = 5, n_rounds: int = 8, seed: int = 0,
             streams: str = "test", progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every learner over the world's users.

    Returns ``(rounds, impressions)``: one row per (learner, user, round), round 0 being
    before any feedback, with ``events``, ``probe_auc``, ``accepts`` and
    ``cumulative_accepts``; and one row per shown item with its position, the policy's
    propensity for it there and the user's answer (the log off-policy evaluation needs).
    A user's stream ends after ``n_rounds`` slates, or when ``k`` or fewer pool items are
    left (the policy would have no choice, so accepts could not tell learners apart).
    """
    rows, impressions = [], []
    root = stream_seed(streams, seed)
    for name, make in learners.items():
        model = make(world.items, world.item_query, world.head_scores)
        if world.population is not None and hasattr(model, "fit_population"):
            model = model.fit_population(world.population)
        for index, u in enumerate(tqdm(world.users, desc=f"{name}", unit="user", leave=False, disable=not progress)):
            rng = np.random.default_rng([*root, index])
            shown_yet = np.zeros(len(u.pool), bool)
            events = cumulative = 0
            base = {"learner": name, "user": u.name, "user_model": u.model}
            rows.append({**base, "round": 0, "events": 0, "accepts": 0, "cumulative_accepts": 0,
                         "probe_auc": _auc(u.probe_truth, model.score(u.name, u.query, u.probe))})
            for r in range(1, n_rounds + 1):
                avail = np.flatnonzero(~shown_yet)
                if len(avail) <= k:  # the policy would have no choice left: every learner would show the same
                    break
                scores = policy_scores(policy, model, u.name, u.query, u.pool[avail], rng)
                slate = policy.select(scores, k, rng)
                shown = avail[np.asarray(slate.items)]
                if shown_yet[shown].any() or len(np.unique(shown)) != len(shown):
                    raise RuntimeError(f"policy {policy!r} showed an item twice to user {u.name}")
                shown_yet[shown] = True
                items, labels = u.pool[shown], u.pool_truth[shown]
                model.learn_many([u.name] * len(items), [u.query] * len(items), items, labels)
                for item, position, propensity, label in zip(items, slate.positions, slate.propensities, labels):
                    impressions.append((name, u.name, r, int(item), int(position), float(propensity), int(label)))
                events += len(items)
                cumulative += int(labels.sum())
                rows.append({**base, "round": r, "events": events, "accepts": int(labels.sum()),
                             "cumulative_accepts": cumulative,
                             "probe_auc": _auc(u.probe_truth, model.score(u.name, u.query, u.probe))})
    columns = ["learner", "user", "round", "item", "position", "propensity", "label"]
    return pd.DataFrame(rows), pd.DataFrame(impressions, columns=columns)


def checkpoints_reached(rounds: pd.DataFrame, checkpoints=CHECKPOINTS) -> list[int]:
    """The checkpoints every user's pool allows (each user has at least that many events)."""
    most = rounds.groupby(["learner", "user"])["events"].max().min()
    return [c for c in checkpoints if c <= most]


def at_events(rounds: pd.DataFrame, events: int) -> pd.DataFrame:
    """Each (learner, user)'s row at the first round with at least ``events`` answers."""
    return rounds[rounds.events >= events].sort_values("round").groupby(["learner", "user"]).head(1)


def _paired(out: dict, values: dict[str, pd.Series], key: str, other: str, sign: int = 1) -> None:
    """``out[name][key]``: the mean over users (or streams) of ``sign * (values[other] - values[name])``,
    paired on the index, with its std as ``key_std``."""
    if other not in values:
        return
    for name, v in values.items():
        diff = sign * (values[other].loc[v.index] - v)
        out[name][key], out[name][f"{key}_std"] = diff.mean(), diff.std(ddof=0)


def summarize(rounds: pd.DataFrame, k: int, checkpoints=CHECKPOINTS, reference: str = "head_only",
              ours: str = "residual") -> dict[str, dict[str, float]]:
    """Per learner: probe AUC (mean, std over users) at each checkpoint reached, also per user
    model; their mean ``probe_auc_mean``; the accepts per shown slate over the whole stream,
    ``cumulative_accepts_per_slate``; and the number of ``users``.

    Differences are paired on the user: ``probe_lift_at_<c>`` is the learner minus
    ``reference``, and ``probe_gap_at_<c>`` and ``accepts_gap`` are ``ours`` minus the learner,
    so that a gap's standard error is its std over the square root of ``users``.
    """
    reached = checkpoints_reached(rounds, checkpoints)
    out: dict[str, dict[str, float]] = {name: {} for name in dict.fromkeys(rounds.learner)}
    for c in reached:
        at = at_events(rounds, c)
        aucs = {name: part.set_index("user").probe_auc for name, part in at.groupby("learner", sort=False)}
        for name, part in at.groupby("learner", sort=False):
            out[name][f"probe_auc_at_{c}"] = part.probe_auc.mean()
            out[name][f"probe_auc_at_{c}_std"] = part.probe_auc.std(ddof=0)
            for model, by_model in part.groupby("user_model"):
                out[name][f"probe_auc_at_{c}_{model}"] = by_model.probe_auc.mean()
        _paired(out, aucs, f"probe_lift_at_{c}", reference, sign=-1)
        _paired(out, aucs, f"probe_gap_at_{c}", ours)
    accepts = {}
    for name, part in rounds.groupby("learner", sort=False):
        out[name]["probe_auc_at_0"] = part[part["round"] == 0].probe_auc.mean()
        if reached:
            out[name]["probe_auc_mean"] = float(np.mean([out[name][f"probe_auc_at_{c}"] for c in reached]))
        shown = part[part["round"] > 0]
        accepts[name] = per_user = shown.groupby("user").accepts.sum() / shown.groupby("user").size()
        out[name]["cumulative_accepts_per_slate"] = per_user.mean()
        out[name]["cumulative_accepts_per_slate_std"] = per_user.std(ddof=0)
        out[name]["users"] = part.user.nunique()
    _paired(out, accepts, "accepts_gap", ours)
    return {name: {key: float(v) for key, v in values.items()} for name, values in out.items()}


def curves(rounds: pd.DataFrame) -> pd.DataFrame:
    """Mean probe AUC and cumulative accepts per learner over events, up to the events every user reaches."""
    most = rounds.groupby(["learner", "user"])["events"].max().min()
    return (rounds[rounds.events <= most].groupby(["learner", "events"], sort=False)[["probe_auc", "cumulative_accepts"]]
            .mean().reset_index().melt(["learner", "events"], var_name="metric").rename(columns={"events": "step"}))


def coldstart(streams: list, learners: dict, items: np.ndarray, item_query: np.ndarray, y: np.ndarray,
              curve_every: int = 5, progress: bool = True, ours: str = "residual") -> tuple[pd.DataFrame, dict]:
    """Prequential AUC from an empty model over ``streams`` of ``(user, query, item order)``.

    Returns ``(curves, finals)``: the mean prequential AUC over the first ``t`` events
    (step ``t``), and per learner the final ``prequential_auc`` with its std over the number
    of ``streams``, and ``prequential_auc_gap``: ``ours`` minus the learner, paired on the stream.
    """
    rows, finals, per_stream = [], {}, {}
    for name, make in learners.items():
        model = make(items, item_query, None)
        results = []
        for user, query, order in tqdm(streams, desc=f"cold start: {name}", unit="stream", leave=False, disable=not progress):
            preds = np.empty(len(order))
            for t, item in enumerate(order):
                preds[t] = model.score(user, query, np.array([item]))[0]
                model.learn_one(user, query, int(item), int(y[item]))
            results.append((preds, y[order]))
        aucs = np.array([roc_auc_score(labels, preds) for preds, labels in results])
        finals[name] = {"prequential_auc": float(aucs.mean()), "prequential_auc_std": float(aucs.std()), "streams": len(aucs)}
        per_stream[name] = pd.Series(aucs)
        shortest = min(len(p) for p, _ in results)
        for t in range(curve_every * 2, shortest + 1, curve_every):
            auc_t = [roc_auc_score(lab[:t], p[:t]) for p, lab in results if len(set(lab[:t])) == 2]
            rows.append({"learner": name, "step": t, "metric": "prequential_auc", "value": float(np.mean(auc_t))})
    _paired(finals, per_stream, "prequential_auc_gap", ours)
    return pd.DataFrame(rows), {name: {key: float(v) for key, v in values.items()} for name, values in finals.items()}


# --------------------------------------------------------------------------- entry
ONLINE_PARAMS = ("name", "seed", "objective", "data", "scenario", "online", "rule", "explore", "baselines")
HEAD_PARAMS = ("learner", "loss", "trainer")


def ours_name(cfg) -> str:
    """What results call ``cfg.online``: ``mixed`` for the mixed learner, ``residual`` otherwise."""
    return "mixed" if cfg.online._target_.endswith("MixedLearner") else "residual"


def _factories(cfg, with_head: bool) -> dict:
    from hydra.utils import instantiate

    learners = {ours_name(cfg): lambda items, item_query, head: instantiate(cfg.online)(
        items=items, item_query=item_query, head_scores=head)}
    for name, spec in (cfg.get("baselines") or {}).items():
        if name == "head_only" and not with_head:
            continue
        learners[name] = (lambda spec: lambda items, item_query, head: instantiate(spec)(
            items=items, item_query=item_query, head_scores=head))(spec)
    return learners


_WORLDS: dict[str, World] = {}  # the last world built, reused by the next job of a grid in this process


def _scale(sc) -> int:
    """How many times the tuning streams' users (or orders) the scenario's streams have."""
    scale = sc.get("test_scale") if sc.streams == "test" else 1
    if scale is None or int(scale) != scale or scale < 1:
        raise ValueError(f"scenario.test_scale must be an integer >= 1, got {scale!r}")
    return int(scale)


def _world(cfg, data) -> World:
    """The scenario's world; a multirun over the learner's settings trains its head only once."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sc = cfg.scenario
    users = {model: count * _scale(sc) for model, count in sc.users.items()}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    key = data.fingerprint + repr({k: resolved.get(k) for k in ("seed", "scenario", *HEAD_PARAMS)})
    if key in _WORLDS:
        return _WORLDS[key]
    if sc.kind == "personalize":
        world = real_users(data, instantiate(cfg.learner), sc.streams, cfg.seed, users, sc.n_clusters, sc.probe_fraction,
                           sc.get("label_noise", 0.0), sc.get("shift", 1.0), sc.get("n_population", 0),
                           sc.get("population_answers", 0.3))
    elif sc.kind == "large_catalog":
        world = large_catalog(data, instantiate(cfg.learner), sc.streams, cfg.seed, users,
                              tuple(sc.n_candidates), sc.n_population, sc.n_components, sc.label_noise,
                              sc.shift, sc.n_clusters, sc.probe_fraction, sc.get("population_users", 0),
                              sc.get("population_answers", 40))
    else:
        raise ValueError(f"scenario.kind must be coldstart, personalize or large_catalog, got {sc.kind!r}")
    _WORLDS.clear()
    _WORLDS[key] = world
    return world


def _run_name(cfg) -> str:
    """``<scenario>-<streams>-<rule>-<its settings>[-<features>][-head_interaction<c>][-<policy>]``, e.g.
    ``personalize-tune-DiagonalLaplace-prior_var3.0``; the features are named when they are not
    ``standardized``, the head interaction when it is on, the slate policy when it is not ``Greedy``.
    A learner without a rule (``MixedLearner``) is named with its own settings instead."""
    policy = cfg.explore._target_.rsplit(".", 1)[-1]
    if policy == "Greedy" or cfg.scenario.kind == "coldstart":  # cold start shows no slates
        policy = ""
    learner = cfg.online._target_.rsplit(".", 1)[-1]
    if learner != "ResidualLearner":  # a learner without a rule: its own settings
        shown = ["k", "factors", "trust", "gate", "prior_var"]
        shown += ["covariance"] * (cfg.online.get("covariance", "full") != "full")  # only where they differ from the default
        shown += ["bias_var"] * (cfg.online.get("bias_var") is not None)
        settings = "-".join(f"{k}{v}" for k, v in cfg.online.items() if k in shown)
        return "-".join(p for p in (cfg.scenario.kind, cfg.scenario.streams, learner, settings, policy) if p)
    rule = cfg.rule._target_.rsplit(".", 1)[-1]
    named = ("lr", "prior_var", "decay", "window", "newton_steps", "head_var")
    settings = "-".join(f"{k}{v}" for k, v in cfg.rule.items() if k in named and v)
    features = "" if cfg.online.features == "standardized" else cfg.online.features
    interaction = f"head_interaction{cfg.online.head_interaction}" if cfg.online.get("head_interaction") else ""
    return "-".join(p for p in (cfg.scenario.kind, cfg.scenario.streams, rule, settings, features, interaction, policy) if p)


def run(cfg) -> dict[str, float]:
    """Run ``cfg.scenario`` for the residual learner and its baselines; log to MLflow.

    Returns ours under the bare keys and each baseline's as ``<key>.<learner>``.
    """
    from hydra.utils import instantiate

    from streamml import tracking
    from streamml.data import load_queries

    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    sc = cfg.scenario
    with_head = sc.kind != "coldstart"
    learners = _factories(cfg, with_head)
    tags = {"data_fingerprint": data.fingerprint, "data_dir": str(cfg.data.dir), "scenario": sc.kind, "streams": sc.streams}
    params = ONLINE_PARAMS + (HEAD_PARAMS if with_head else ())
    with tracking.start_run(cfg, tags=tags, run_name=_run_name(cfg), params=params) as active:
        if sc.kind == "coldstart":
            streams = coldstart_streams(data, sc.streams, cfg.seed, sc.n_orders * _scale(sc))
            curve_table, per_learner = coldstart(streams, learners, data.X, data.query, data.y, ours=ours_name(cfg))
        else:
            world = _world(cfg, data)
            print(f"{sc.kind} ({sc.streams} streams): {len(world.users)} users, {len(world.items)} catalog items")
            rounds, impressions = interact(world, learners, instantiate(cfg.explore), sc.k, sc.n_rounds, cfg.seed, sc.streams)
            tracking.log_table(rounds, "results/rounds.csv")
            tracking.log_table(impressions, "results/impressions.csv")
            per_learner = summarize(rounds, sc.k, ours=ours_name(cfg))
            curve_table = curves(rounds)
        ours = ours_name(cfg)
        metrics = dict(per_learner[ours])
        metrics.update({f"{key}.{name}": v for name, vals in per_learner.items() if name != ours for key, v in vals.items()})
        tracking.log_curves(curve_table, title=f"{cfg.name}: {sc.kind}, {sc.streams} streams")
        tracking.log_metrics(metrics)
    summary = pd.DataFrame(per_learner).T
    shown = [c for c in summary.columns if re.fullmatch(r"probe_auc_at_\d+|cumulative_accepts_per_slate|prequential_auc", c)]
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(f"\nMLflow run {active.info.run_id} in experiment '{cfg.name}' ({cfg.logger.tracking_uri})")
        print(summary[shown].to_string())
    return metrics
