"""The README's online snippet runs as written, from the repository root, on the shipped data."""

import re

import numpy as np
import yaml

from conftest import REPO


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_online_snippet_runs_with_the_experiments_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(readme_block("ResidualLearner("), namespace)
    learner, candidates = namespace["learner"], namespace["candidates"]
    experiment = yaml.safe_load((REPO / "configs" / "experiment" / "online_personalize.yaml").read_text())
    rule = yaml.safe_load((REPO / "configs" / "rule" / f"{experiment['defaults'][2]['/rule']}.yaml").read_text())
    assert type(learner.rule).__name__ == rule["_target_"].rsplit(".", 1)[-1]
    assert {k: getattr(learner.rule, k) for k in experiment["rule"]} == experiment["rule"]
    assert {k: getattr(learner, k) for k in experiment["online"]} == experiment["online"]
    assert sorted(namespace["best"].tolist()) == sorted(candidates.tolist())
    assert len(learner.store) == 2  # users 7 and 8 remain; 42 was forgotten
    assert np.isfinite(learner.score(7, 3, namespace["data"].X[candidates])).all()
