"""Per-key state stores behind one batched interface (:mod:`streamml.stores.base`).

:mod:`streamml.stores.sqlite` (embedded default) and :mod:`streamml.stores.redis`
(needs the ``serve`` extra) hold the same state out of process.
"""

from streamml.stores.base import Field, Schema, Store, as_key_list, occurrences
from streamml.stores.memory import InMemoryStore
from streamml.stores.errors import HeadMismatch, StoreUnavailable  # noqa: E402  (after base: no cycle)
from streamml.stores.sqlite import SQLiteDB, SQLiteEventLog, SQLiteItems, SQLiteStore  # noqa: E402

__all__ = [
    "Field", "InMemoryStore", "Schema", "Store", "as_key_list", "occurrences",
    "HeadMismatch", "StoreUnavailable", "SQLiteDB", "SQLiteEventLog", "SQLiteItems", "SQLiteStore",
]
