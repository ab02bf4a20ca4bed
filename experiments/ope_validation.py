# ruff: noqa: E402  (BLAS threads are set before numpy is imported)
"""Validate the slate OPE estimators on the simulator, where each target's value is known exactly.

    python experiments/ope_validation.py [--seeds 20] [--data data/queries] [--out experiments/ope_validation.md]

Per seed, a world of :func:`streamml.online.scenarios.real_users` (test streams) is served by
the service's online learner (residual, diagonal Laplace rule) under a **logging** policy,
``EpsilonSlots(n_explore=2)`` or ``PlackettLuce(T=1)``; the learner learns from every logged slate,
as the service does. At every logged slate (a user, the candidates left in the user's pool) the
**targets** are computed from the learner's state at that moment:

* ``greedy_head``: the top k by the head alone (the residual ignored);
* ``greedy_residual``: the top k by head + residual (the learner's own greedy slate);
* ``thompson``: the top k of a posterior draw (marginals from 200 draws);
* a sweep moving away from the logging policy: ``EpsilonSlots(e)`` for e = 2, 1, 0 under
  epsilon logging, ``PlackettLuce(T)`` for T = 1, 0.5, 0.25, 0.1 under Plackett-Luce logging.

The truth of a target is its **on-policy expectation on the same users and slates**:
``mean over logged slates of sum_{i,p} q[i, p] * answer_i``, exact given the user's answers
(no sampling noise in the truth; the simulated users' answers do not depend on the position).
This is the quantity OPE estimates when the target is a function of the logged history; a
target that learnt from its own slates would meet other candidates in later rounds.

Each estimator's 95% interval is the bootstrap over users (:func:`streamml.loop.ope.bootstrap_ci`).
Reported over seeds: bias (mean of estimate - truth), RMSE, coverage of the truth by the interval,
the mean interval width, and ``off-support``: the share of a target's mass on (item, position)
pairs that the logging policy never shows (IPS, SNIPS and PI cannot see that mass; DR only
through its reward model; epsilon slots keeps its greedy items within ``n_explore`` positions
of their rank). DR's reward model is the logging learner's own ``sigmoid(score)`` at that slate
(``dr``); ``dr_fitted`` calibrates those scores on the log (:class:`streamml.loop.reward_model.PlattRewardModel`,
cross-fitted: each half of the users gets the model fitted on the other half's slates), the
analogue of ``python -m streamml.loop evaluate``, which calibrates the champion head's scores on
the slates before its held-out slice in time; ``dr_miscalibrated`` feeds DR
``sigmoid(0.3 score - 1)``, a link as wrong as a ranking head's raw scale can be (Platt scaling
does not see an affine change of the scores, so ``dr_fitted`` is also what that head would get).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # small matrices: BLAS threads only contend (10x slower pinv on 2 shared cores)

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from streamml.data import load_queries
from streamml.loop.ope import SlateLog, bootstrap_ci, doubly_robust, ips, logging_moments, pi_weights, pseudo_inverse, snips
from streamml.loop.reward_model import PlattRewardModel
from streamml.offline.baselines import SklearnLR
from streamml.online import ResidualLearner
from streamml.online.policies import EpsilonSlots, Greedy, PlackettLuce, Thompson
from streamml.online.rules import DiagonalLaplace
from streamml.online.scenarios import real_users, stream_seed
from streamml.provenance import git_commit, machine

REPO = Path(__file__).resolve().parents[1]
K = 5
ESTIMATORS = ("ips", "snips", "dr", "dr_fitted", "dr_miscalibrated", "pi")
LOGGING = {"epsilon_slots": EpsilonSlots(n_explore=2), "plackett_luce": PlackettLuce(temperature=1.0)}
SWEEP = {"epsilon_slots": {f"epsilon_slots(e={e})": EpsilonSlots(n_explore=e) for e in (2, 1, 0)},
         "plackett_luce": {f"plackett_luce(T={t:g})": PlackettLuce(temperature=t) for t in (1.0, 0.5, 0.25, 0.1)}}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_world(world, logging, seed: int, n_thompson: int = 200, pi_draws: int = 4000) -> dict:
    """Serve every user of ``world`` with ``logging`` while the learner learns; at each slate keep
    what the estimators need and every target's marginals."""
    learner = ResidualLearner(world.items, world.item_query, rule=DiagonalLaplace(prior_var=3.0),
                              head_scores=world.head_scores)
    head_only = ResidualLearner(world.items, world.item_query, rule=DiagonalLaplace(prior_var=3.0),
                                head_scores=world.head_scores)  # never learns: the head's standardised score
    root = stream_seed("test", seed)
    out = {"shown": [], "rewards": [], "props": [], "users": [], "answers": [], "pi_w": [], "scores": [],
           "queries": [],
           "logging_marg": [], "targets": {}}
    targets = out["targets"]
    for index, u in enumerate(world.users):
        rng = np.random.default_rng([*root, 7, index])
        shown_yet = np.zeros(len(u.pool), bool)
        while True:
            avail = np.flatnonzero(~shown_yet)
            if len(avail) <= K:
                break
            ids = u.pool[avail]
            scores = learner.score(u.name, u.query, ids)
            slate = logging.select(scores, K, rng)
            marg, gamma = logging_moments(logging, scores, K, n_draws=pi_draws, rng=rng)
            q = {"greedy_head": Greedy().marginals(head_only.score(u.name, u.query, ids), K),
                 "greedy_residual": Greedy().marginals(scores, K),
                 "thompson": Thompson(n_thompson).marginals(learner.sample_scores(u.name, u.query, ids, n_thompson, rng), K)}
            for name, policy in SWEEP[_name(logging)].items():
                q[name] = policy.marginals(scores, K)
            for name, m in q.items():
                targets.setdefault(name, []).append(m)
            items = np.asarray(slate.items)
            labels = u.pool_truth[avail]
            out["shown"].append(items)
            out["rewards"].append(labels[items].astype(float))
            out["props"].append(np.asarray(slate.propensities))
            out["users"].append(u.name)
            out["answers"].append(labels.astype(float))
            out["scores"].append(np.asarray(scores, np.float64))
            out["queries"].append(u.query)
            out["pi_w"].append(pi_weights(gamma, items))
            out["logging_marg"].append(policy_marginals(logging, scores, marg))
            shown_yet[avail[items]] = True
            learner.learn_many([u.name] * K, [u.query] * K, ids[items], labels[items])
    return out


def policy_marginals(logging, scores, sampled):
    """The logging policy's exact marginals (PlackettLuce's by quadrature, not the sampled ones)."""
    return logging.marginals(scores, K) if isinstance(logging, PlackettLuce) else sampled


def _name(policy) -> str:
    return next(name for name, p in LOGGING.items() if p is policy)


def cross_fitted(logged: dict, seed: int, folds: int = 2) -> list[np.ndarray]:
    """DR's reward model fitted to the log: each fold of users gets the model of the others' slates."""
    users = np.array(logged["users"])
    names = np.unique(users)
    fold = dict(zip(names.tolist(), (np.random.default_rng(seed).permutation(len(names)) % folds).tolist()))
    of = np.array([fold[u] for u in users.tolist()])
    out: list = [None] * len(users)
    for f in range(folds):
        train = np.flatnonzero(of != f)
        model = PlattRewardModel().fit([logged["scores"][i][logged["shown"][i]] for i in train],
                                       [logged["queries"][i] for i in train], [logged["rewards"][i] for i in train])
        for i in np.flatnonzero(of == f):
            out[i] = model.predict(logged["scores"][i], logged["queries"][i])
    return out


def evaluate(logged: dict, seed: int) -> list[dict]:
    """Every estimator on every target of one logged world, against the truth."""
    log = SlateLog(logged["shown"], logged["rewards"], logged["props"], groups=np.array(logged["users"]))
    fitted = cross_fitted(logged, seed)
    own = [_sigmoid(s) for s in logged["scores"]]  # the logging learner's own sigmoid(score)
    miscalibrated = [_sigmoid(0.3 * s - 1.0) for s in logged["scores"]]
    rows = []
    for target, q in logged["targets"].items():
        truth = float(np.mean([(m * a[:, None]).sum() for m, a in zip(q, logged["answers"])]))
        off = float(np.mean([(m * (mu <= 0)).sum() / m.sum() for m, mu in zip(q, logged["logging_marg"])]))
        tv = float(np.mean([0.5 * np.abs(m - mu).sum() / m.shape[1] for m, mu in zip(q, logged["logging_marg"])]))
        terms = {"ips": ips(log, q), "snips": snips(log, q), "dr": doubly_robust(log, q, own),
                 "dr_fitted": doubly_robust(log, q, fitted), "dr_miscalibrated": doubly_robust(log, q, miscalibrated),
                 "pi": pseudo_inverse(log, q, weights=logged["pi_w"])}
        for name, t in terms.items():
            est, lo, hi = bootstrap_ci(t, log.groups, n_boot=1000, rng=seed)
            rows.append({"target": target, "estimator": name, "seed": seed, "truth": truth, "estimate": est,
                         "low": lo, "high": hi, "off_support": off, "tv": tv, "slates": len(log)})
    return rows


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    df = df.assign(error=df.estimate - df.truth, covered=(df.low <= df.truth) & (df.truth <= df.high), width=df.high - df.low)
    g = df.groupby(["logging", "target", "estimator"], sort=False)
    return pd.DataFrame({"truth": g.truth.mean(), "bias": g.error.mean(), "rmse": g.error.apply(lambda e: np.sqrt((e ** 2).mean())),
                         "coverage": g.covered.mean(), "ci_width": g.width.mean(), "off_support": g.off_support.mean(),
                         "tv_to_logging": g.tv.mean()}).reset_index()


def _markdown(rst: str) -> str:
    """The docstring's design section as Markdown: no Sphinx roles, single backticks."""
    return re.sub(r":\w+:`([^`]+)`", r"``\1``", rst).replace("``", "`").strip()


def _table(df: pd.DataFrame, cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--data", default=str(REPO / "data" / "queries"))
    ap.add_argument("--out", default=str(REPO / "experiments" / "ope_validation.md"))
    ap.add_argument("--users", default="none=3,flip_cluster=1,shift=1", help="user model=count per query half")
    ap.add_argument("--chosen", default="dr_fitted", choices=ESTIMATORS)  # the analogue of `streamml.loop evaluate`'s DR
    args = ap.parse_args(argv)
    users = {k: int(v) for k, v in (p.split("=") for p in args.users.split(","))}
    at_commit, start = git_commit(short=True, cwd=REPO), time.time()
    data = load_queries(args.data, 384, 0)
    rows = []
    for seed in range(args.seeds):
        world = real_users(data, SklearnLR(C=10.0, max_iter=1000), "test", seed, users, label_noise=0.1)
        for name, logging in LOGGING.items():
            rows += [{"logging": name, **r} for r in evaluate(log_world(world, logging, seed), seed)]
        print(f"seed {seed}: {time.time() - start:.0f} s", file=sys.stderr)
    df = pd.DataFrame(rows)
    summary = summarize(df)
    main_targets = summary[summary.target.isin(["greedy_head", "greedy_residual", "thompson"])]
    sweep = summary[~summary.target.isin(["greedy_head", "greedy_residual", "thompson"])]
    chosen = main_targets[main_targets.estimator == args.chosen]
    slates = df.groupby(["logging", "seed"]).slates.first()
    cmd = "python experiments/ope_validation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n\n".join([
        "# Off-policy evaluation of slates on the simulator (issue 19)",
        f"Command: `{cmd.strip()}`  \nCommit: {at_commit}  \nMachine: {machine()} (shared with other jobs)  \n"
        f"Data: `{Path(args.data).relative_to(REPO) if Path(args.data).is_relative_to(REPO) else args.data}`, "
        f"{len(data.query_ids)} queries; users per query half: {users}; k = {K}; "
        f"{args.seeds} seeds; {slates.mean():.0f} logged slates per seed and logging policy "
        f"({len(set(df.seed))} worlds); run time {time.time() - start:.0f} s.",
        _markdown(__doc__.split("\n\n", 2)[2]),
        "At a user's first slate the logged and the on-policy candidates are the same (the full pool, a learner "
        "that has seen nothing), so there the truth is exactly the target's on-policy expectation on the same users.",
        f"## The three targets\n\nChosen estimator: **{args.chosen}**; its 95% coverage over "
        f"{args.seeds} seeds: " + ", ".join(f"{r.logging}/{r.target} {r.coverage:.2f}" for _, r in chosen.iterrows())
        + f" (minimum {chosen.coverage.min():.2f}; pooled over the six: {chosen.coverage.mean():.3f}). "
        f"With {args.seeds} seeds one miss moves a coverage by {1 / args.seeds:.2f}.",
        _table(main_targets, ["logging", "target", "estimator", "truth", "bias", "rmse", "coverage", "ci_width", "off_support"]),
        "## Moving away from the logging policy\n\n`tv_to_logging`: mean total variation between the target's and the "
        "logging policy's marginals per position (0: the logging policy itself).",
        _table(sweep, ["logging", "target", "estimator", "tv_to_logging", "truth", "bias", "rmse", "coverage", "ci_width"]),
    ])
    Path(args.out).write_text(text + "\n")
    df.to_csv(Path(args.out).with_suffix(".csv"), index=False)
    print(text)
    return summary


if __name__ == "__main__":
    main()
