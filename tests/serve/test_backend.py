"""streamml.serve.backend: catalogs, per-head state namespaces and the control record."""

from __future__ import annotations

import numpy as np
import pytest

from streamml.serve.backend import Backend, MemoryBackend, SQLiteBackend
from streamml.stores import Field
from streamml.stores.events import Catalog, EventLog
from tests.stores.conformance import assert_conforms


@pytest.fixture(params=["memory", "sqlite", "redis", pytest.param("cluster", marks=pytest.mark.slow)])
def backend(request, tmp_path):
    b = _open(request, tmp_path)
    yield b
    b.close()  # stops the SQLite checkpointer thread, which a later fork must not inherit


def _open(request, tmp_path):
    if request.param == "memory":
        return MemoryBackend()
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "s.db")
    from streamml.serve.backend import RedisBackend

    if request.param == "cluster":
        node = request.getfixturevalue("redis_cluster").nodes[0]
        return RedisBackend(f"redis://127.0.0.1:{node.port}", cluster=True, prefix=f"b{tmp_path.name[-8:]}")
    server = request.getfixturevalue("redis_server")
    return RedisBackend(f"redis://127.0.0.1:{server.port}/0", prefix=f"b{tmp_path.name[-8:]}")


def test_catalog_state_namespaces_and_control(backend, served_models):
    assert_conforms(backend, Backend)
    assert_conforms(backend.events, EventLog)
    assert_conforms(backend.catalog, Catalog)
    items_dir = served_models[0]
    assert backend.catalog.queries() == []
    assert backend.catalog.load_folder(items_dir) == 120
    assert backend.catalog.queries() == ["topic_0", "topic_1", "topic_2"]
    ids, texts, X = backend.catalog.items("topic_1")
    assert ids.tolist() == list(range(40, 80)) and texts[0] == "topic 1 sentence 0" and X.shape == (40, 384)
    schema = {"residual": Field((4,), "float32")}
    a, b = backend.state(schema, "head0"), backend.state(schema, "head1")
    a.put_many([("u", "q")], {"residual": np.ones((1, 4))})
    assert ("u", "q") in a and ("u", "q") not in b  # another head never sees these residuals
    assert backend.control.get() is None
    backend.control.set({"version": 1, "uri": "runs:/x/model", "previous": None})
    assert backend.control.get()["uri"] == "runs:/x/model"
    assert backend.health() == {"status": "ready"}
