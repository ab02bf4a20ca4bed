"""The item catalog in the service's SQLite file, and ``python -m streamml.stores.sqlite load``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from streamml.stores.events import read_catalog
from streamml.stores.sqlite_db import SQLiteDB, open_db

__all__ = ["SQLiteItems", "load_items", "main"]


class SQLiteItems:
    """The item catalog: each query's items with their text and embedding.

    Item ids are the row positions of :func:`streamml.data.load_queries` over the
    folder (the online learner's catalog ids for the same folder); queries are the
    query files' stems.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> items = SQLiteItems(pathlib.Path(tempfile.mkdtemp()) / "state.db")
    >>> items.queries()
    []
    """

    def __init__(self, path: SQLiteDB | str | Path, **db_kwargs):
        self.db = open_db(path, **db_kwargs)
        self.db.ensure_meta()
        with self.db.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS items (item_id INTEGER PRIMARY KEY, query TEXT NOT NULL, "
                "text TEXT NOT NULL, embedding BLOB NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS items_query ON items(query, item_id)")

    def load_folder(self, folder: str | Path, embedding_dim: int = 384) -> int:
        """Replace the catalog with the query files of ``folder``; returns the item count."""
        c = read_catalog(folder, embedding_dim)
        X = c.X
        rows = zip(c.ids.tolist(), c.queries, c.texts, (x.tobytes() for x in X))
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM items")
            conn.executemany("INSERT INTO items(item_id, query, text, embedding) VALUES (?, ?, ?, ?)", rows)
            self.db.meta_set(conn, "items.fingerprint", c.fingerprint)
            self.db.meta_set(conn, "items.embedding_dim", str(X.shape[1]))
            self.db.meta_set(conn, "items.queries", json.dumps(c.query_ids))
        return len(X)

    @property
    def fingerprint(self) -> str | None:
        """The loaded folder's data fingerprint (:attr:`streamml.data.QueryData.fingerprint`)."""
        return self.db.meta_get(self.db.conn, "items.fingerprint")

    def queries(self) -> list[str]:
        """Query ids, in file order."""
        text = self.db.meta_get(self.db.conn, "items.queries")
        return [] if text is None else json.loads(text)

    def _rows(self, where: str = "", args: tuple = ()):
        rows = self.db.conn.execute(f"SELECT item_id, query, text, embedding FROM items {where} ORDER BY item_id", args).fetchall()
        ids = np.array([r[0] for r in rows], np.int64)
        dim = int(self.db.meta_get(self.db.conn, "items.embedding_dim") or 0)
        X = np.frombuffer(b"".join(r[3] for r in rows), np.float32).reshape(len(rows), dim).copy()
        return ids, [r[1] for r in rows], [r[2] for r in rows], X

    def items(self, query: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(ids (n,), texts, X (n, d) float32)`` of one query; ``KeyError`` if unknown."""
        ids, _, texts, X = self._rows("WHERE query = ?", (str(query),))
        if not len(ids):
            raise KeyError(f"unknown query {query!r}; the catalog has {self.queries()}")
        return ids, texts, X

    def all(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        """``(ids, query of each item, texts, X)`` of the whole catalog (to build a learner)."""
        return self._rows()

def load_items(db: SQLiteDB | str | Path, folder: str | Path, embedding_dim: int = 384) -> int:
    """Load a folder of query files into the catalog of ``db``; returns the item count."""
    return SQLiteItems(db).load_folder(folder, embedding_dim=embedding_dim)


def main(argv: list[str] | None = None) -> None:
    """``python -m streamml.stores.sqlite load FOLDER --db state.db``."""
    parser = argparse.ArgumentParser(prog="python -m streamml.stores.sqlite",
                                     description="Load a folder of query files into the item catalog of a SQLite file.")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load a folder of query JSON files into the item catalog")
    load.add_argument("folder")
    load.add_argument("--db", default="state.db")
    load.add_argument("--embedding-dim", type=int, default=384)
    args = parser.parse_args(argv)
    n = load_items(args.db, args.folder, args.embedding_dim)
    print(f"loaded {n} items of {len(SQLiteItems(args.db).queries())} queries into {args.db}")
