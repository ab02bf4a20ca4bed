"""Per-key state stores behind one batched interface (:mod:`streamml.stores.base`).

:mod:`streamml.stores.sqlite` (embedded default) and :mod:`streamml.stores.redis`
(needs the ``serve`` extra) hold the same state out of process.
"""

from streamml.stores.base import Field, Schema, Store, as_key_list, occurrences
from streamml.stores.errors import HeadMismatch, StoreUnavailable
from streamml.stores.memory import InMemoryStore

_SQLITE = ("Checkpointer", "SQLiteDB", "SQLiteEventLog", "SQLiteItems", "SQLiteStore")

__all__ = [
    "Field", "InMemoryStore", "Schema", "Store", "as_key_list", "occurrences",
    "HeadMismatch", "StoreUnavailable", *_SQLITE,
]


def __getattr__(name: str):
    # imported on first use, so that `python -m streamml.stores.sqlite` runs the module only once
    if name in _SQLITE:
        from streamml.stores import sqlite

        return getattr(sqlite, name)
    raise AttributeError(f"module 'streamml.stores' has no attribute {name!r}")
