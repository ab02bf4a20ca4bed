"""Scratch of issue 17's cold start (tuning streams): moderated scores, see experiments/mixed_sim_tuning.md.

The prequential AUC pools the predictions a stream made at different times, so scores that are
calibrated across time could rank better: the posterior predictive log-odds (probit-moderated,
``mu / sqrt(1 + pi/8 s)``) of the factor term ("mod"), or of the whole model with its bias ("modfull").
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


class Moderated(MixedLearner):
    full = False

    def score(self, user, query, X):
        self._query(query)
        ids = self._check_items(np.asarray(X), plain(query))
        state = self._state(user, query)
        d = self._F.shape[1]
        diff = np.zeros((d, d))
        diff[np.tril_indices(d)] = state["cov"]
        S = self._prior + diff + np.tril(diff, -1).T
        m = state["mean"].astype(np.float64)
        if self.full:
            V = self._F[ids]
            var = np.einsum("ij,jk,ik->i", V, S, V)
            return ((self._offset[ids] + V @ m) / np.sqrt(1 + math.pi / 8 * var)).astype(np.float32)
        weight = 1 / (1 + math.exp(-float(state["gain"]))) if self.gate else 1.0
        V = self._F[ids, 1:]
        var = np.einsum("ij,jk,ik->i", V, S[1:, 1:], V)
        return (self._offset[ids] + weight * (V @ m[1:]) / np.sqrt(1 + math.pi / 8 * var)).astype(np.float32)


class ModeratedFull(Moderated):
    full = True


cfg = cfg_for("mixed_coldstart")
data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
streams = coldstart_streams(data, "tune", 0, 5)
variants = {}
for k in (16, 32):
    for suffix, cls in (("", MixedLearner), ("-mod", Moderated), ("-modfull", ModeratedFull)):
        variants[f"k{k}{suffix}"] = (lambda k, cls: lambda i, q, h: cls(i, q, h, k=k, factors="als", trust=True,
                                                                         prior_var=3.0))(k, cls)
_, fin = simulate.coldstart(streams, variants, data.X, data.query, data.y, progress=False, ours="k16")
for n, v in fin.items():
    print(n, round(v["prequential_auc"], 4))
