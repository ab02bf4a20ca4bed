"""Scratch of issue 17's cold start (tuning streams, seeds 0 and 1): what the mixed learner misses.

1. A ceiling: the exact posterior maximum over all of a key's events (Newton to convergence), in
   the factor space, with and without the per-key bias.
2. The mixed learner's own update with a small bias prior (``bias_var``), full and diagonal
   covariance (``covariance``), gate on and off.

Usage: ``python experiments/mixed_sim_tuning/cs6.py [ceiling|grid] SEED``; see mixed_sim_tuning.md.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import cfg_for, load_queries, simulate  # noqa: E402

from streamml.online import MixedLearner  # noqa: E402
from streamml.online.checks import plain  # noqa: E402
from streamml.online.scenarios import coldstart_streams  # noqa: E402


class Exact(MixedLearner):
    """The posterior maximum over every event of the key, solved again at each event (no budget)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._events, self._w = {}, {}

    def score(self, user, query, X):
        ids, w = np.asarray(X), self._w.get((plain(user), plain(query)))
        return self._offset[ids] + (0 if w is None else self._F[ids, 1:] @ w[1:])

    def learn_one(self, user, query, item, label):
        key = (plain(user), plain(query))
        ev = self._events.setdefault(key, [])
        ev.append((item, label))
        ids, y = np.array([e[0] for e in ev]), np.array([e[1] for e in ev], float)
        keep = np.diag(self._prior) > 0  # bias_var 0: no bias coordinate
        F, o, P = self._F[ids][:, keep], self._offset[ids], np.diag(1 / np.diag(self._prior)[keep])
        w = self._w.get(key, np.zeros(self._F.shape[1]))[keep]
        for _ in range(30):
            p = 1 / (1 + np.exp(-(o + F @ w)))
            step = np.linalg.solve((F * (p * (1 - p))[:, None]).T @ F + P, F.T @ (y - p) - P @ w)
            w = w + step
            if np.abs(step).max() < 1e-9:
                break
        full = np.zeros(self._F.shape[1])
        full[keep] = w
        self._w[key] = full


def variant(cls=MixedLearner, **kw):
    return lambda i, q, h: cls(i, q, h, factors="als", **kw)


mode, seed = sys.argv[1], int(sys.argv[2])
cfg = cfg_for("mixed_coldstart")
data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
streams = coldstart_streams(data, "tune", seed, 5)
variants = {"configured (k16, trust, prior 3)": variant(k=16, trust=True, prior_var=3.0)}
if mode == "ceiling":
    for k in (16, 48):
        for pv in (1.0, 3.0, 10.0):
            for bv in (pv, 0.0):
                variants[f"exact k{k} prior_var {pv} bias_var {bv}"] = variant(Exact, k=k, prior_var=pv, bias_var=bv)
else:
    for k, cov in ((16, "full"), (32, "full"), (48, "full"), (48, "diagonal")):
        for pv in (3.0, 5.0, 10.0):
            for bv in (pv, 0.0):
                for gate in (True, False):
                    variants[f"{cov} k{k} prior_var {pv} bias_var {bv} gate {gate}"] = variant(
                        k=k, prior_var=pv, bias_var=bv, gate=gate, covariance=cov)
_, fin = simulate.coldstart(streams, variants, data.X, data.query, data.y, progress=False, ours=next(iter(variants)))
for name, v in fin.items():
    print(f"seed {seed}\t{name}\t{v['prequential_auc']:.4f}", flush=True)
