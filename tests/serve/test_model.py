"""streamml.serve.model: the head taken out of the MLflow pyfunc scores exactly as the pyfunc does."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from streamml.serve import model


def test_load_head_scores_like_the_logged_pyfunc(served_models):
    _, tracking_uri, (old, new) = served_models
    head = model.load_head(new, tracking_uri)
    X = np.random.default_rng(0).normal(size=(5, 384)).astype(np.float32)
    pyfunc = mlflow.pyfunc.load_model(new)
    for query in head.query_ids:
        expected = pyfunc.predict(pd.DataFrame({"query_id": [query] * 5, "embedding": list(X)}))
        np.testing.assert_allclose(head.score(query, X), expected, rtol=1e-5, atol=1e-5)
    assert head.uri == new and len(head.fingerprint) == 64 and head.version == head.fingerprint[:12]
    assert model.load_head(old, tracking_uri).fingerprint != head.fingerprint
    assert model.load_head(new, tracking_uri) is head  # a run's model never changes: loaded once


def test_resolve_takes_the_newest_finished_run_or_the_given_uri(served_models):
    _, tracking_uri, (_, new) = served_models
    assert model.resolve_model_uri(None, tracking_uri) == new
    assert model.resolve_model_uri("models:/streamml@champion", tracking_uri) == "models:/streamml@champion"
    with pytest.raises(LookupError, match="no MLflow experiment 'nope'.*python -m streamml.train"):
        model.resolve_model_uri(None, tracking_uri, "nope")


def test_mlp_head_in_numpy_equals_torch():
    import torch

    from streamml.offline.heads import MLPHeads

    torch.manual_seed(0)
    heads = MLPHeads(n_groups=2, dim=6, hidden=4).eval()
    p = {k: v.detach().numpy() for k, v in heads.named_parameters()}
    head = model.Head.mlp(["a", "b"], p["w1"], p["b1"], p["w2"], p["b2"], uri="mem")
    X = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    with torch.no_grad():
        expected = heads(torch.from_numpy(X), torch.tensor([1, 1, 1])).numpy()
    np.testing.assert_allclose(head.score("b", X), expected, rtol=1e-5, atol=1e-6)
