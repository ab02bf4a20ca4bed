"""Simulated users: the online learner against its baselines on identical streams.

Three scenarios, each predicting before it learns (river's progressive validation):

* ``coldstart``: no head. One pass over each query's items in a random order, by one
  user per order; the prequential AUC is the AUC of the scores given before each label.
* ``personalize``: each query's items are split in two stratified halves; a head trained
  on the population labels of one half scores the other, whose items are a user's
  candidates. The user's truth flips the population label inside one k-means cluster of
  the candidates. Each round the learner ranks the unseen candidates, a policy shows
  ``k`` of them, the user answers on those, and we record the AUC of the learner's scores
  against the truth over all candidates (``user_auc``) and over those the user has not
  answered yet (``user_auc_unseen``, which memorising the answers cannot inflate), the
  NDCG@k of the shown slate and the accepts.
* ``drift``: personalisation whose truth flips a different cluster at ``drift_round``;
  ``rounds_to_recover`` counts the rounds until the AUC against the new truth is back to
  its level just before the change (minus ``tolerance``).

Every learner meets the same users, candidates, truths and policy random streams.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import ndcg_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from streamml.data import QueryData


class HeadOnly:
    """No adaptation: the frozen head's scores, whatever the feedback."""

    def __init__(self, head_scores: np.ndarray):
        self.head_scores = np.asarray(head_scores)

    def score(self, user, query, item_ids) -> np.ndarray:
        return self.head_scores[np.asarray(item_ids)]

    def learn_one(self, user, query, item, label) -> None:
        pass


def coldstart(data: QueryData, learners: dict, n_orders: int = 5, seed: int = 0, curve_every: int = 5):
    """Prequential AUC from an empty model, per query and order.

    ``learners`` maps a name to ``factory(head_scores) -> model``. Returns ``(curves,
    finals)``: the mean prequential AUC over the first ``t`` events (step ``t``) and the
    final ``prequential_auc`` with its std over the query x order streams.
    """
    y = data.y
    curves, finals = [], {}
    for name, make in learners.items():
        model = make(None)
        streams = []
        for q in tqdm(range(len(data.query_ids)), desc=f"cold start: {name}", unit="query", leave=False):
            for order in range(n_orders):
                items = np.random.default_rng([seed, q, order]).permutation(np.flatnonzero(data.query == q))
                user = f"order{order}"
                preds = np.empty(len(items))
                for t, item in enumerate(items):
                    preds[t] = model.score(user, q, np.array([item]))[0]
                    model.learn_one(user, q, int(item), int(y[item]))
                streams.append((preds, y[items]))
        aucs = np.array([roc_auc_score(labels, preds) for preds, labels in streams])
        finals[name] = {"prequential_auc": aucs.mean(), "prequential_auc_std": aucs.std()}
        shortest = min(len(p) for p, _ in streams)
        for t in range(curve_every * 2, shortest + 1, curve_every):
            auc_t = [roc_auc_score(lab[:t], p[:t]) for p, lab in streams if len(set(lab[:t])) == 2]
            curves.append({"learner": name, "step": t, "metric": "prequential_auc", "value": float(np.mean(auc_t))})
    return pd.DataFrame(curves), finals


def users(data: QueryData, n_users: int = 5, n_clusters: int = 3, seed: int = 0, drift: bool = False):
    """Simulated users: candidates, the population split they are not scored by, and truths.

    Returns a list of dicts with ``user``, ``query``, ``candidates`` (item ids), ``truth``
    and, with ``drift``, ``truth_after`` (another cluster flipped).
    """
    out = []
    for q in range(len(data.query_ids)):
        rows = np.flatnonzero(data.query == q)
        halves = StratifiedKFold(2, shuffle=True, random_state=seed + q).split(rows, data.y[rows])
        for h, (_, cand) in enumerate(halves):
            cand = rows[cand]
            cluster = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(data.X[cand])
            for u in range(n_users):
                rng = np.random.default_rng([seed, q, h, u])
                flipped = rng.permutation(n_clusters)
                truth = np.where(cluster == flipped[0], 1 - data.y[cand], data.y[cand])
                user = {"user": f"q{q}h{h}u{u}", "query": q, "half": h, "candidates": cand, "truth": truth}
                if drift:
                    user["truth_after"] = np.where(cluster == flipped[1], 1 - data.y[cand], data.y[cand])
                out.append(user)
    return out


def halves_head_scores(data: QueryData, head, simulated_users: list[dict]) -> np.ndarray:
    """Each item's score from a head fit on the other half of its query (population labels)."""
    half = np.full(len(data.y), -1)
    for u in simulated_users:
        half[u["candidates"]] = u["half"]
    groups = data.query * 2 + half
    head.fit(data.X, data.y, groups)
    return head.score(data.X, data.query * 2 + (1 - half))


def _auc(truth, scores) -> float:
    return roc_auc_score(truth, scores) if len(set(truth)) == 2 else np.nan


def personalize(data: QueryData, learners: dict, policy, simulated_users: list[dict], head_scores: np.ndarray,
                k: int = 5, n_rounds: int = 4, drift_round: int | None = None, seed: int = 0):
    """Run every learner over the same users.

    Returns ``(rounds, impressions)``: one row per (learner, user, round) with the metrics,
    and one row per shown item with its position, the policy's propensity for it there
    and the user's answer, the log that off-policy evaluation needs.
    """
    rows, impressions = [], []
    for name, make in learners.items():
        model = make(head_scores)
        for index, u in enumerate(tqdm(simulated_users, desc=f"users: {name}", unit="user", leave=False)):
            cand, q, user = u["candidates"], u["query"], u["user"]
            rng = np.random.default_rng([seed, index])
            pool = np.ones(len(cand), bool)
            answered = np.zeros(len(cand), bool)
            events = 0
            for r in range(n_rounds):
                truth = u["truth_after"] if drift_round is not None and r >= drift_round else u["truth"]
                if pool.sum() < k:
                    pool[:] = True  # every candidate seen: show them again
                avail = np.flatnonzero(pool)
                slate = policy.select(model.score(user, q, cand[avail]), k, rng)
                shown = avail[np.asarray(slate.items)]
                pool[shown] = False
                answered[shown] = True
                for i, position, propensity in zip(shown, slate.positions, slate.propensities):
                    model.learn_one(user, q, int(cand[i]), int(truth[i]))
                    impressions.append((name, user, r + 1, int(cand[i]), int(position), float(propensity), int(truth[i])))
                events += len(shown)
                gains = truth[shown][None, :]
                rows.append({
                    "learner": name, "user": user, "round": r + 1, "events": events,
                    "user_auc": _auc(truth, scores := model.score(user, q, cand)),
                    "user_auc_unseen": _auc(truth[~answered], scores[~answered]),
                    f"ndcg_at_{k}": ndcg_score(gains, -np.arange(len(shown))[None, :].astype(float)) if gains.any() else 0.0,
                    "accepted": int(truth[shown].sum()),
                })
    columns = ["learner", "user", "round", "item", "position", "propensity", "label"]
    return pd.DataFrame(rows), pd.DataFrame(impressions, columns=columns)


def user_auc_at(table: pd.DataFrame, events: int, column: str = "user_auc") -> pd.Series:
    """Mean AUC against the truth at the first round with at least ``events`` feedback events."""
    first = table[table.events >= events].groupby(["learner", "user"]).head(1)
    return first.groupby("learner")[column].mean()


def rounds_to_recover(table: pd.DataFrame, drift_round: int, tolerance: float = 0.02) -> pd.Series:
    """Mean rounds after the drift until AUC (new truth) >= AUC just before it - tolerance.

    A user who never recovers counts as the rounds left plus one (censored).
    """

    def one(user_rows: pd.DataFrame) -> float:
        before = user_rows.loc[user_rows["round"] == drift_round, "user_auc"].item()
        after = user_rows[user_rows["round"] > drift_round]
        ok = np.flatnonzero(after["user_auc"].to_numpy() >= before - tolerance)
        return float(ok[0] + 1) if len(ok) else float(len(after) + 1)

    per_user = table.groupby(["learner", "user"])[["round", "user_auc"]].apply(one)
    return per_user.groupby("learner").mean()


def _summaries(kind: str, table_or_finals, scenario) -> dict[str, dict[str, float]]:
    """Final scalars per learner: the issue's keys for each scenario."""
    if kind == "coldstart":
        return table_or_finals
    table = table_or_finals
    out = {name: {"user_auc_at_10": v} for name, v in user_auc_at(table, 10).items()}
    for name, v in user_auc_at(table, 10, "user_auc_unseen").items():
        out[name]["user_auc_unseen_at_10"] = v
    for name, group in table.groupby("learner"):
        out[name]["accepted_per_round"] = float(group["accepted"].mean())
        out[name][f"ndcg_at_{scenario.k}"] = float(group[f"ndcg_at_{scenario.k}"].mean())
    if kind == "drift":
        for name, v in rounds_to_recover(table, scenario.drift_round, scenario.tolerance).items():
            out[name]["rounds_to_recover"] = v
    return out


def _run_name(cfg) -> str:
    rule = cfg.rule._target_.rsplit(".", 1)[-1]
    return f"{cfg.scenario.kind}-{rule}-lr{cfg.rule.lr}-decay{cfg.rule.decay}-{cfg.online.features}"


def run(cfg) -> dict[str, float]:
    """Run ``cfg.scenario`` for the residual learner and its baselines; log to MLflow."""
    from hydra.utils import instantiate

    from streamml import tracking
    from streamml.offline.baselines import RiverOnline, SklearnRefitOnline
    from streamml.data import load_queries

    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    scenario = cfg.scenario
    learners = {
        "residual": lambda head: instantiate(cfg.online)(items=data.X, item_query=data.query, head_scores=head),
        "river": lambda head: RiverOnline(data.X),
        "sklearn_refit": lambda head: SklearnRefitOnline(data.X),
    }
    tags = {"data_fingerprint": data.fingerprint, "data_dir": str(cfg.data.dir), "scenario": scenario.kind}
    with tracking.start_run(cfg, tags=tags, run_name=_run_name(cfg)) as run:
        if scenario.kind == "coldstart":
            curves, results = coldstart(data, learners, scenario.n_orders, cfg.seed)
        else:
            simulated = users(data, scenario.n_users, scenario.n_clusters, cfg.seed, drift=scenario.kind == "drift")
            head_scores = halves_head_scores(data, instantiate(cfg.learner), simulated)
            learners["head_only"] = HeadOnly
            drift_round = scenario.drift_round if scenario.kind == "drift" else None
            table, impressions = personalize(data, learners, instantiate(cfg.explore), simulated, head_scores,
                                             scenario.k, scenario.n_rounds, drift_round, cfg.seed)
            tracking.log_table(impressions, "results/impressions.csv")
            metric_cols = ["user_auc", "user_auc_unseen", f"ndcg_at_{scenario.k}", "accepted"]
            curves = table.groupby(["learner", "round"])[metric_cols].mean().reset_index().melt(
                ["learner", "round"], var_name="metric").rename(columns={"round": "step"})
            results = table
            tracking.log_table(table, "results/rounds.csv")
        per_learner = _summaries(scenario.kind, results, scenario)
        metrics = dict(per_learner["residual"])
        metrics.update({f"{key}.{name}": v for name, vals in per_learner.items() for key, v in vals.items() if name != "residual"})
        tracking.log_curves(curves, title=f"{cfg.name}: {scenario.kind}")
        tracking.log_metrics(metrics)
    summary = pd.DataFrame(per_learner).T
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(f"\nMLflow run {run.info.run_id} in experiment '{cfg.name}' ({cfg.logger.tracking_uri})")
        print(summary.to_string())
    return metrics
