"""Scratch of issue 17's cold start (tuning streams): a diagonal posterior, see experiments/mixed_sim_tuning.md.

In a query's principal basis the items' coordinates are uncorrelated, so after many of the
query's items the posterior precision is nearly diagonal there: a diagonal covariance (2 (1 + k)
numbers) could afford every direction (k = 48) within the state budget. The same ADF step as
``streamml.online.mixed.adf_step``, with ``S`` kept diagonal; states in a dict (scratch only).
"""
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import cfg_for, load_queries, simulate  # noqa: E402

from streamml.online import MixedLearner  # noqa: E402
from streamml.online.checks import plain  # noqa: E402
from streamml.online.scenarios import coldstart_streams  # noqa: E402

PROBIT = math.pi / 8


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


class Diagonal(MixedLearner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._states = {}

    def _diag_state(self, key):
        if key not in self._states:  # mean, diagonal covariance, bias-only (mean, var), gain
            d = self._F.shape[1]
            self._states[key] = [np.zeros(d), np.diag(self._prior).copy(), np.array([0.0, self._prior[0, 0]]), 0.0]
        return self._states[key]

    def score(self, user, query, X):
        ids = np.asarray(X)
        state = self._diag_state((plain(user), plain(query)))
        weight = 1 / (1 + math.exp(-state[3])) if self.gate else 1.0
        return self._offset[ids] + weight * (self._F[ids, 1:] @ state[0][1:])

    def learn_one(self, user, query, item, label):
        state = self._diag_state((plain(user), plain(query)))
        m, S, b, gain = state
        f, o, y = self._F[item], self._offset[item], float(label)
        mu, s = o + f @ m, (f * f) @ S
        mu_b, s_b = o + b[0], b[1]
        sign = 1.0 if y else -1.0
        state[3] = gain + log_sigmoid(sign * mu / math.sqrt(1 + PROBIT * s)) - log_sigmoid(sign * mu_b / math.sqrt(1 + PROBIT * s_b))
        p = 1 / (1 + math.exp(-mu))
        lam, Sf = p * (1 - p), S * f
        m += Sf * (y - p) / (1 + lam * s)
        S -= Sf * Sf * lam / (1 + lam * s)
        p_b = 1 / (1 + math.exp(-mu_b))
        lam_b = p_b * (1 - p_b)
        b[0] += s_b * (y - p_b) / (1 + lam_b * s_b)
        b[1] -= s_b * s_b * lam_b / (1 + lam_b * s_b)


cfg = cfg_for("mixed_coldstart")
data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
streams = coldstart_streams(data, "tune", 0, 5)
variants = {"k16": lambda i, q, h: MixedLearner(i, q, h, k=16, factors="als", trust=True, prior_var=3.0)}
for k in (16, 48, 64):
    for pv in (1.0, 3.0, 10.0):
        variants[f"diag-k{k}-pv{pv}"] = (lambda k, pv: lambda i, q, h: Diagonal(i, q, h, k=k, factors="als", trust=True,
                                                                                 prior_var=pv))(k, pv)
_, fin = simulate.coldstart(streams, variants, data.X, data.query, data.y, progress=False, ours="k16")
for n, v in fin.items():
    print(n, round(v["prequential_auc"], 4))
