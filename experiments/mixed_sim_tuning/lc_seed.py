"""Scratch of issue 17's simulator criteria (tuning streams): see experiments/mixed_sim_tuning.md.

Trust factor on and off on the tuning streams of another seed: ``python experiments/mixed_sim_tuning/lc_seed.py 1``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import lifts, run, world_for  # noqa: E402

from streamml.online import MixedLearner  # noqa: E402
from streamml.online.baselines import HeadOnly  # noqa: E402

seed = int(sys.argv[1])
w = world_for("mixed_large_catalog", "tune", seed)
mk = lambda **kw: (lambda items, iq, h: MixedLearner(items, iq, h, **{"k": 16, "factors": "als", "trust": True, "prior_var": 3.0, **kw}))  # noqa: E731
r = run(w, {"head_only": lambda i, q, h: HeadOnly(i, q, h), "trust": mk(), "notrust": mk(trust=False)}, seed=seed)
print(lifts(r).round(4).to_string(), flush=True)
