"""Per-key state stores behind one batched interface (:mod:`streamml.stores.base`)."""

from streamml.stores.base import Field, Schema, Store, as_key_list, occurrences
from streamml.stores.memory import InMemoryStore

__all__ = ["Field", "InMemoryStore", "Schema", "Store", "as_key_list", "occurrences"]
