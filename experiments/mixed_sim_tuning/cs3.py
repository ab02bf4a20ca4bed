"""Scratch of issue 17's simulator criteria (tuning streams): see experiments/mixed_sim_tuning.md."""
import math
import pickle  # noqa: F401
import sys  # noqa: F401
import time  # noqa: F401
from pathlib import Path  # noqa: F401

import numpy as np  # noqa: F401
from hydra.utils import instantiate  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import numba
from harness import cfg_for, lifts, load_queries, run, simulate, world_for  # noqa: E402, F401

from streamml.online import MixedLearner, mixed
from streamml.online.kernel_support import my_events as _my_events
from streamml.online.scenarios import coldstart_streams

_log_sigmoid = mixed._log_sigmoid
_PROBIT = mixed._PROBIT

@numba.njit(cache=False, nogil=True)
def _events_mm(mean, cov, bias, gain, rows, items, labels, F, PF, o, prior_b, part, parts):
    d = F.shape[1]
    Sf = np.empty(d)
    for e in _my_events(rows, part, parts):
        r, i = rows[e], items[e]
        y = 1.0 if labels[e] else 0.0
        for a in range(d):
            Sf[a] = PF[i, a]
        t = 0
        for a in range(d):
            fa = F[i, a]
            acc = 0.0
            for b in range(a):
                c = cov[r, t]
                acc += c * F[i, b]
                Sf[b] += c * fa
                t += 1
            Sf[a] += acc + cov[r, t] * fa
            t += 1
        mu = o[i]
        s = 0.0
        for a in range(d):
            mu += F[i, a] * mean[r, a]
            s += F[i, a] * Sf[a]
        mu_b = o[i] + bias[r, 0]
        s_b = prior_b + bias[r, 1]
        sign = 1.0 if y > 0 else -1.0
        kap = 1.0 / math.sqrt(1.0 + _PROBIT * s)
        kap_b = 1.0 / math.sqrt(1.0 + _PROBIT * s_b)
        gain[r] += _log_sigmoid(sign * mu * kap) - _log_sigmoid(sign * mu_b * kap_b)
        p = 1.0 / (1.0 + math.exp(-mu * kap))
        step = kap * (y - p)
        shrink = kap * kap * p * (1.0 - p)
        t = 0
        for a in range(d):
            mean[r, a] += Sf[a] * step
            sa = Sf[a] * shrink
            for b in range(a + 1):
                cov[r, t] -= sa * Sf[b]
                t += 1
        p_b = 1.0 / (1.0 + math.exp(-mu_b * kap_b))
        bias[r, 0] += s_b * kap_b * (y - p_b)
        bias[r, 1] -= s_b * s_b * kap_b * kap_b * p_b * (1.0 - p_b)

cfg = cfg_for("mixed_coldstart")
data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
streams = coldstart_streams(data, "tune", 0, 5)
mode = sys.argv[1]
if mode == "mm":
    mixed._events = _events_mm
variants = {}
for pv in (1.0, 3.0, 10.0, 30.0):
    variants[f"{mode}-k16-pv{pv}"] = (lambda pv: lambda i, q, h: MixedLearner(i, q, h, k=16, factors="als", trust=True, prior_var=pv))(pv)
variants[f"{mode}-k48-pv10"] = lambda i, q, h: MixedLearner(i, q, h, k=48, factors="als", trust=True, prior_var=10.0)
_, fin = simulate.coldstart(streams, variants, data.X, data.query, data.y, progress=False, ours=f"{mode}-k16-pv3.0")
for n, v in fin.items():
    print(n, round(v["prequential_auc"], 4))
