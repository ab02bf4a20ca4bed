"""Scratch: tuning-stream worlds cached on disk; mixed variants vs head, per subgroup lift."""
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

REPO = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "streamml" / "sim_tuning"  # simulated worlds, outside the repository
CACHE.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, str(REPO))
from streamml.data import load_queries  # noqa: E402
from streamml.online import simulate  # noqa: E402


def cfg_for(exp, streams="tune", extra=()):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={exp}", f"data.dir={REPO.parent / 'shared' / 'data' / 'queries'}",
                                          f"scenario.streams={streams}", *extra])
    return cfg


def world_for(exp, streams="tune", seed=0):
    path = Path(f"{CACHE}/world_{exp}_{streams}_{seed}.pkl")
    if path.exists():
        return pickle.loads(path.read_bytes())
    cfg = cfg_for(exp, streams, [f"seed={seed}"])
    data = load_queries(cfg.data.dir, cfg.data.embedding_dim, cfg.data.min_per_class)
    w = simulate._world(cfg, data)
    path.write_bytes(pickle.dumps(w))
    return w


def run(world, learners, exp="mixed_large_catalog", seed=0, streams="tune"):
    cfg = cfg_for(exp, streams)
    rounds, _ = simulate.interact(world, learners, instantiate(cfg.explore), cfg.scenario.k, cfg.scenario.n_rounds,
                                  seed, streams, progress=False)
    return rounds


def lifts(rounds, ref="head_only"):
    out = []
    for c in (0,) + simulate.CHECKPOINTS:
        at = rounds[rounds["round"] == 0] if c == 0 else simulate.at_events(rounds, c)
        if at.empty:
            continue
        piv = at.pivot_table(index=["user", "user_model"], columns="learner", values="probe_auc").reset_index()
        for name in [n for n in dict.fromkeys(rounds.learner) if n != ref]:
            d = piv[name] - piv[ref]
            row = {"learner": name, "c": c, "auc": piv[name].mean(), "lift": d.mean(), "se": d.std() / np.sqrt(len(d))}
            for m, g in piv.groupby("user_model"):
                row[m] = (g[name] - g[ref]).mean()
            out.append(row)
    return pd.DataFrame(out)
