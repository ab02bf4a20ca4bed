"""streamml.serve.lifecycle: staged checks, publishing, and two workers agreeing on the model."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate

from streamml.serve.backend import MemoryBackend
from streamml.serve.lifecycle import Lifecycle, bootstrap, prepare
from streamml.serve.model import Head
from tests.serve.serve_helpers import serve_cfg


def test_prepare_refuses_a_head_that_cannot_serve_the_catalog(served_models):
    items_dir, _, _ = served_models
    backend = MemoryBackend()
    backend.catalog.load_folder(items_dir)
    two = Head.linear(["topic_0", "topic_1"], np.zeros((2, 384)), np.zeros(2), uri="two")
    with pytest.raises(ValueError, match="model two has no head for catalog query 'topic_2'"):
        prepare(two, backend.catalog)
    narrow = Head.linear(["topic_0", "topic_1", "topic_2"], np.zeros((3, 8)), np.zeros(3), uri="narrow")
    with pytest.raises(ValueError, match="384-d embeddings, model narrow takes 8"):
        prepare(narrow, backend.catalog)
    nan = Head.linear(["topic_0", "topic_1", "topic_2"], np.full((3, 384), np.nan), np.zeros(3), uri="nan")
    with pytest.raises(ValueError, match="non-finite scores on catalog query 'topic_0'"):
        prepare(nan, backend.catalog)
    with pytest.raises(ValueError, match="the item catalog is empty"):
        prepare(two, MemoryBackend().catalog)


def test_a_reload_published_by_one_worker_reaches_another(served_models):
    items_dir, tracking_uri, (old, new) = served_models
    cfg = serve_cfg(items_dir, tracking_uri)
    backend = MemoryBackend()  # one backend, two workers' lifecycles
    assert bootstrap(cfg, backend) == new
    a, b = (Lifecycle(backend, instantiate(cfg.online), tracking_uri) for _ in range(2))
    for w in (a, b):
        w.activate(w.prepare(backend.control.get()["uri"]))
        w.seen_version = backend.control.get()["version"]
    assert a.pending() is None
    a.activate(a.prepare(old))
    assert a.publish(old) == {"version": 2, "uri": old, "previous": new}
    record = b.pending()
    assert record["uri"] == old
    b.activate(b.prepare(record["uri"]))
    b.seen_version = record["version"]
    assert b.current.version == a.current.version and b.pending() is None
    assert bootstrap(cfg, backend) == old  # an existing record wins ...
    assert bootstrap(cfg, backend, publish=True) == new  # ... unless the service (re)starts
    assert backend.control.get() == {"version": 3, "uri": new, "previous": old}
