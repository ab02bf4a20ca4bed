"""How keys and records become bytes in the remote stores (SQLite, Redis).

Keys are encoded canonically as compact JSON: ``3`` -> ``3``, ``"alice"`` ->
``"alice"``, ``(3, "q")`` -> ``[3,"q"]``. Numpy integers and bools become Python
ints first, so ``np.int64(3)``, ``True`` and ``3`` follow the same equality as the
in-memory store (``1`` and ``True`` are one key, ``1`` and ``(1,)`` are two).
Only ints, strings and (nested) tuples of them are accepted: a float key such as
``0.1`` has no exact, portable spelling, so it is rejected rather than guessed.

A record is one fixed-size blob: the fields' bytes, in schema order, in their
dtypes' native byte order. One blob per key means one row (SQLite) or one string
(Redis) per key, a single read or write per key whatever the schema holds, and no
per-field overhead (a Redis hash pays some per field: ``experiments/serve_stores_figures.md``). Fields have fixed
shapes, so a field is a fixed byte range of the blob. The schema's
:attr:`RecordCodec.signature` is stored next to the data so that opening it with
another schema fails instead of reading garbage.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping

import numpy as np

from streamml.stores.base import Field, Keys, as_key_list

__all__ = ["plain_key", "encode_key", "encode_keys", "RecordCodec", "check_unique", "to_json"]


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"event record value {v!r} of type {type(v).__name__} is not JSON serialisable")


def to_json(record) -> str:
    """Compact JSON of an event record; numpy scalars and arrays become numbers and lists,
    anything else JSON cannot hold is a ``TypeError`` (the same on every event log).

    >>> to_json({"k": np.int64(3), "x": np.array([0.5])})
    '{"k":3,"x":[0.5]}'
    """
    return json.dumps(record, default=_jsonable, separators=(",", ":"))


def plain_key(key: Hashable, where: str = "key"):
    """The key as JSON-ready Python values: ints, strings and lists."""
    if isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str):
        return key
    if isinstance(key, tuple):
        return [plain_key(k, where) for k in key]
    raise TypeError(
        f"{where}: keys must be ints, strings or tuples of them, got {key!r} of type {type(key).__name__}"
    )


def encode_key(key: Hashable, where: str = "key") -> str:
    """Canonical text of one key.

    >>> encode_key((np.int64(3), "q1")), encode_key(7), encode_key((7,)), encode_key("7")
    ('[3,"q1"]', '7', '[7]', '"7"')
    """
    return json.dumps(plain_key(key, where), separators=(",", ":"))


def encode_keys(keys: Keys, where: str = "keys") -> list[str]:
    """Canonical texts of a batch of keys (numpy int arrays take a fast path)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iub":
        if keys.ndim == 1:
            return [str(v) for v in keys.astype(np.int64).tolist()]
        if keys.ndim == 2 and keys.shape[1] >= 1:
            return ["[" + ",".join(map(str, row)) + "]" for row in keys.astype(np.int64).tolist()]
        raise ValueError(f"{where}: integer key arrays must be (B,) or (B, w>=1), got shape {keys.shape}")
    return [encode_key(k, where) for k in as_key_list(keys)]


def check_unique(encoded: list[str], op: str) -> None:
    if len(set(encoded)) != len(encoded):
        raise ValueError(
            f"{op} got the same key more than once in one batch; "
            "merge the updates first (which value should win is ambiguous)"
        )


class RecordCodec:
    """Pack the fields of a batch of records into one blob per key, and back.

    Examples
    --------
    >>> codec = RecordCodec({"r": Field((2,), "float16"), "n": Field((), "int32", fill=-1)})
    >>> codec.nbytes
    8
    >>> blobs = codec.pack({"r": np.ones((1, 2))}, 1)
    >>> out = codec.unpack(blobs + [None])      # None: a missing key reads as the fill
    >>> out["r"].tolist(), out["n"].tolist()
    ([[1.0, 1.0], [0.0, 0.0]], [-1, -1])
    """

    def __init__(self, schema: Mapping[str, Field]):
        if not schema:
            raise ValueError("schema must have at least one field")
        self.schema: dict[str, Field] = dict(schema)
        self.offsets: dict[str, tuple[int, int]] = {}
        at = 0
        for name, f in self.schema.items():
            if not isinstance(f, Field):
                raise TypeError(f"schema[{name!r}] must be a Field, got {type(f).__name__}")
            self.offsets[name] = (at, at + f.nbytes)
            at += f.nbytes
        self.nbytes = at
        fill = np.empty(at, np.uint8)
        for name, f in self.schema.items():
            lo, hi = self.offsets[name]
            fill[lo:hi] = np.full(f.shape, f.fill, f.dtype).reshape(-1).view(np.uint8)
        self.fill = fill.tobytes()

    @property
    def signature(self) -> str:
        """JSON that identifies the blob layout (names, shapes, dtypes with byte order, fills)."""
        return json.dumps(
            [[n, list(f.shape), f.dtype.str, f.fill] for n, f in self.schema.items()], separators=(",", ":")
        )

    def check_values(self, values: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Validate and cast ``values`` (same errors as the in-memory store)."""
        out = {}
        for name, v in values.items():
            f = self.schema.get(name)
            if f is None:
                raise KeyError(f"unknown field {name!r}; schema has {sorted(self.schema)}")
            v = np.asarray(v)
            if v.shape[:1] != (n,) or v.shape[1:] != f.shape:
                raise ValueError(f"field {name!r}: expected shape {(n, *f.shape)}, got {v.shape}")
            if v.dtype != f.dtype and not np.can_cast(v.dtype, f.dtype, "same_kind"):
                raise TypeError(f"field {name!r}: cannot store {v.dtype} values as {f.dtype}")
            out[name] = np.ascontiguousarray(v, f.dtype)
        return out

    def _matrix(self, blobs: list[bytes | None]) -> np.ndarray:
        joined = b"".join(self.fill if b is None else b for b in blobs)
        if len(joined) != len(blobs) * self.nbytes:
            raise ValueError(
                f"stored records are not {self.nbytes} bytes long: the data was written with another schema"
            )
        return np.frombuffer(joined, np.uint8).reshape(len(blobs), self.nbytes)

    def unpack(self, blobs: list[bytes | None]) -> dict[str, np.ndarray]:
        """``{field: (n, *shape) array}`` of ``n`` blobs (``None`` = fill values); arrays are copies."""
        m = self._matrix(blobs)
        out = {}
        for name, f in self.schema.items():
            lo, hi = self.offsets[name]
            out[name] = m[:, lo:hi].copy().view(f.dtype).reshape(len(blobs), *f.shape)
        return out

    def pack(self, values: Mapping[str, np.ndarray], n: int, base: list[bytes | None] | None = None) -> list[bytes]:
        """Blobs of ``n`` records: ``values`` (checked), the other fields from ``base``
        (the stored blobs, ``None`` for new keys) or the fill values."""
        vals = self.check_values(values, n)
        if n == 0:
            return []
        if len(vals) == len(self.schema) or base is None:
            m = np.empty((n, self.nbytes), np.uint8)
            if len(vals) != len(self.schema):
                m[:] = np.frombuffer(self.fill, np.uint8)
        else:
            m = self._matrix(base).copy()
        for name, v in vals.items():
            lo, hi = self.offsets[name]
            m[:, lo:hi] = v.reshape(n, -1).view(np.uint8)
        return [row.tobytes() for row in m]
