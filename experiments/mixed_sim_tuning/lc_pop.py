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

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
t = time.time()
path = Path(f"{CACHE}/world_lcpop_tune_{seed}.pkl")
if path.exists():
    w = pickle.loads(path.read_bytes())
else:
    cfg = cfg_for("mixed_large_catalog", "tune", [f"seed={seed}", "+scenario.population_users=20"])
    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    w = simulate._world(cfg, data)
    path.write_bytes(pickle.dumps(w))
print("world", len(w.users), len(w.items), len(w.population), time.time() - t, flush=True)
mk = lambda **kw: (lambda items, iq, h: MixedLearner(items, iq, h, **{"k": 16, "factors": "als", "trust": True, "prior_var": 3.0, **kw}))
learners = {"head_only": lambda i, q, h: HeadOnly(i, q, h), "mixed": mk(), "mixed_nogate": mk(gate=False)}
r = run(w, learners, seed=seed)
r.to_pickle(f"{CACHE}/rounds_lcpop_{seed}.pkl")
print(lifts(r).round(4).to_string())
m = mk()(w.items, w.item_query, w.head_scores).fit_population(w.population)
print(m.population.history["factors"], np.round(np.diag(m.population.prior_cov), 3), m.population.slope, m.population.intercept)
print(time.time() - t)
