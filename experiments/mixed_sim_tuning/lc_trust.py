"""Scratch of issue 17's simulator criteria (tuning streams): see experiments/mixed_sim_tuning.md."""
import pickle  # noqa: F401
import sys  # noqa: F401
import time  # noqa: F401
from pathlib import Path  # noqa: F401

import numpy as np  # noqa: F401
from hydra.utils import instantiate  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
from harness import CACHE, cfg_for, lifts, load_queries, run, simulate, world_for  # noqa: E402, F401

from streamml.online import MixedLearner
from streamml.online.baselines import HeadOnly

mk = lambda **kw: (lambda items, iq, h: MixedLearner(items, iq, h, **{"k": 16, "factors": "als", "trust": True, "prior_var": 3.0, **kw}))
for tag, path in (("nopop", f"{CACHE}/world_mixed_large_catalog_tune_0.pkl"), ("pop", f"{CACHE}/world_lcpop_tune_0.pkl")):
    w = pickle.loads(Path(path).read_bytes())
    r = run(w, {"head_only": lambda i, q, h: HeadOnly(i, q, h), f"notrust_{tag}": mk(trust=False)})
    print(lifts(r).round(4).to_string(), flush=True)
