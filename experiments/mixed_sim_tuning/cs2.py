"""Scratch of issue 17's simulator criteria (tuning streams): see experiments/mixed_sim_tuning.md."""
import pickle  # noqa: F401
import sys  # noqa: F401
import time  # noqa: F401
from pathlib import Path  # noqa: F401

import numpy as np  # noqa: F401
from hydra.utils import instantiate  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
from harness import cfg_for, lifts, load_queries, run, simulate, world_for  # noqa: E402, F401

from streamml.online import MixedLearner
from streamml.online.scenarios import coldstart_streams

cfg = cfg_for("online_coldstart")
data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
streams = coldstart_streams(data, "tune", 0, 5)
variants = {"residual": lambda i, q, h: instantiate(cfg.online)(items=i, item_query=q, head_scores=h)}
for pv in (3.0, 10.0, 30.0):
    variants[f"k48-notrust-pv{pv}"] = (lambda pv: lambda i, q, h: MixedLearner(i, q, h, k=48, factors="als", trust=False, prior_var=pv))(pv)
    variants[f"k48-nogate-pv{pv}"] = (lambda pv: lambda i, q, h: MixedLearner(
        i, q, h, k=48, factors="als", trust=False, gate=False, prior_var=pv))(pv)
_, fin = simulate.coldstart(streams, variants, data.X, data.query, data.y, progress=False, ours="residual")
for n, v in fin.items():
    print(n, round(v["prequential_auc"], 4))
