"""Per-key state stores behind one batched interface (see :mod:`streamml.stores.memory`)."""

from streamml.stores.memory import Field, InMemoryStore, Schema, Store, as_key_list, occurrences

__all__ = ["Field", "InMemoryStore", "Schema", "Store", "as_key_list", "occurrences"]
