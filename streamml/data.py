"""Query files -> one validated, de-duplicated table, and CV splits that respect it.

A folder holds one JSON file per search query (the query id is the file stem), each a
list of ``{"text", "label": "accepted"|"rejected", "embedding": [D floats]}``. Bad input
fails loudly, naming the file (as a path), the row and the field, because a silently
dropped row changes every metric downstream. This module imports numpy and pandas only
(sklearn waits for the splits), so the training entry validates the data before its
heavy imports and a bad file fails within seconds.

Exact duplicate texts inside a query are merged before anything else: the copies carry
the same embedding, so leaving them in would let one text sit on both sides of a split.
After the merge every row is a unique text, so stratified splits are grouped by text.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

LABELS = {"accepted": 1, "rejected": 0}


class DataValidationError(ValueError):
    """A query file does not match the format; the message names file, row and field."""


@dataclass(frozen=True)
class QueryData:
    """All queries in one table.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per unique (query, text): ``query_id``, ``query`` (int index into
        ``query_ids``), ``text``, ``label`` (1 accepted, 0 rejected), ``copies``.
    X : numpy.ndarray
        (N, D) float32 embeddings, aligned with ``frame``.
    query_ids : list of str
        File stems, sorted; ``frame.query`` indexes into it.
    fingerprint : str
        sha256 of the files' bytes, to tag runs with the exact data they saw.
    """

    frame: pd.DataFrame
    X: np.ndarray
    query_ids: list[str]
    fingerprint: str

    @property
    def y(self) -> np.ndarray:
        return self.frame["label"].to_numpy(np.int64)

    @property
    def query(self) -> np.ndarray:
        return self.frame["query"].to_numpy(np.int64)

    @property
    def n_duplicates(self) -> int:
        """Rows removed by merging exact duplicate texts."""
        return int((self.frame["copies"] - 1).sum())


def _read_rows(path: Path, embedding_dim: int) -> list[tuple[str, int, np.ndarray]]:
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataValidationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(rows, list):
        raise DataValidationError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise DataValidationError(f"{where}: expected an object, got {type(row).__name__}")
        for field in ("text", "label", "embedding"):
            if field not in row:
                raise DataValidationError(f"{where}: missing field '{field}'")
        text, label, emb = row["text"], row["label"], row["embedding"]
        if not isinstance(text, str) or not text.strip():
            raise DataValidationError(f"{where} field 'text': expected a non-empty string")
        if label not in LABELS:
            raise DataValidationError(
                f"{where} field 'label': unknown label {label!r}, expected one of {sorted(LABELS)}"
            )
        if not isinstance(emb, list) or len(emb) != embedding_dim:
            got = len(emb) if isinstance(emb, list) else type(emb).__name__
            raise DataValidationError(f"{where} field 'embedding': expected {embedding_dim} floats, got {got}")
        try:
            vec = np.asarray(emb, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DataValidationError(f"{where} field 'embedding': not numeric ({err})") from err
        if not np.isfinite(vec).all():
            bad = int(np.flatnonzero(~np.isfinite(vec))[0])
            raise DataValidationError(f"{where} field 'embedding': non-finite value at index {bad}")
        out.append((text, LABELS[label], vec.astype(np.float32)))
    return out


def _merge_duplicates(path: Path, rows: list[tuple[str, int, np.ndarray]]) -> pd.DataFrame:
    first: dict[str, int] = {}
    copies: dict[str, int] = {}
    for i, (text, label, _) in enumerate(rows):
        if text in first:
            j = first[text]
            if rows[j][1] != label:
                raise DataValidationError(
                    f"{path} rows {j} and {i} field 'label': duplicate text with conflicting labels: {text[:60]!r}"
                )
            copies[text] += 1
        else:
            first[text], copies[text] = i, 1
    keep = list(first.values())
    return pd.DataFrame(
        {
            "text": [rows[i][0] for i in keep],
            "label": [rows[i][1] for i in keep],
            "copies": [copies[rows[i][0]] for i in keep],
            "row": keep,
        }
    ).assign(embedding=[rows[i][2] for i in keep])


def load_queries(directory: str | Path, embedding_dim: int = 384, min_per_class: int = 20) -> QueryData:
    """Load and validate every ``*.json`` query file in ``directory``.

    Raises
    ------
    DataValidationError
        For any malformed row, a duplicate text with conflicting labels, or a query
        with no accepted or no rejected sentence. Fewer than ``min_per_class`` of a
        class only warns: the query still trains, its metrics are just noisier.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory not found: {directory.resolve()}")
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise DataValidationError(f"{directory}: no *.json query files found")
    digest = hashlib.sha256()
    frames = []
    for q, path in enumerate(paths):
        digest.update(path.name.encode() + path.read_bytes())
        frame = _merge_duplicates(path, _read_rows(path, embedding_dim))
        counts = frame["label"].value_counts()
        for name, value in LABELS.items():
            n = int(counts.get(value, 0))
            if n == 0:
                raise DataValidationError(f"{path}: query has no {name} sentence; it cannot be ranked")
            if n < min_per_class:
                warnings.warn(f"{path.name}: only {n} {name} sentences (< {min_per_class})", stacklevel=2)
        frames.append(frame.assign(query_id=path.stem, query=q))
    frame = pd.concat(frames, ignore_index=True)
    X = np.stack(frame.pop("embedding").to_list())
    cols = ["query_id", "query", "text", "label", "copies", "row"]
    return QueryData(frame[cols], X, [p.stem for p in paths], digest.hexdigest()[:16])


def cv_splits(data: QueryData, n_folds: int = 5, n_repeats: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Repeated k-fold splits, stratified inside each query.

    Fold ``k`` of the result is the union over queries of each query's fold ``k``, so
    one split trains every query's head at once. Rows are unique texts (see module
    docstring), so no text is on both sides.

    Returns
    -------
    list of (train_idx, test_idx)
        ``n_folds * n_repeats`` pairs of row indices into ``data.frame``.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold  # here: validating a file must not wait for sklearn

    y, query = data.y, data.query
    n_splits = n_folds * n_repeats
    train: list[list[np.ndarray]] = [[] for _ in range(n_splits)]
    test: list[list[np.ndarray]] = [[] for _ in range(n_splits)]
    for q in range(len(data.query_ids)):
        rows = np.flatnonzero(query == q)
        if np.bincount(y[rows], minlength=2).min() < n_folds:
            raise DataValidationError(
                f"{data.query_ids[q]}: fewer than n_folds={n_folds} sentences of one class; lower cv.n_folds"
            )
        splitter = RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=n_repeats, random_state=seed + q)
        for k, (tr, te) in enumerate(splitter.split(rows, y[rows])):
            train[k].append(rows[tr])
            test[k].append(rows[te])
    return [(np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))) for tr, te in zip(train, test)]



def nested_splits(
    data: QueryData, n_folds: int = 5, n_repeats: int = 3, inner_folds: int = 4, seed: int = 0
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[tuple[np.ndarray, np.ndarray]]]]:
    """Outer splits as in `cv_splits`, and inner k-fold splits of each outer training part.

    A search chooses on the inner folds (the tuning figure) and is judged on the outer test
    rows, which no inner split of that outer fold contains (the held-out figure). Inner folds
    are stratified inside each query, like the outer ones, and rows are unique texts, so no
    text straddles an inner or an outer split either.

    Returns
    -------
    outer : list of (train_idx, test_idx)
        ``n_folds * n_repeats`` pairs, identical to ``cv_splits(data, n_folds, n_repeats, seed)``.
    inner : list of list of (train_idx, test_idx)
        ``inner[k]`` holds ``inner_folds`` pairs partitioning ``outer[k][0]``.
    """
    from sklearn.model_selection import StratifiedKFold

    outer = cv_splits(data, n_folds, n_repeats, seed)
    y, query = data.y, data.query
    inner = []
    for k, (outer_train, _) in enumerate(outer):
        parts: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(inner_folds)]
        for q in range(len(data.query_ids)):
            rows = outer_train[query[outer_train] == q]
            if np.bincount(y[rows], minlength=2).min() < inner_folds:
                raise DataValidationError(
                    f"{data.query_ids[q]}: fewer than cv.inner_folds={inner_folds} sentences of one class "
                    f"in outer split {k}; lower cv.inner_folds"
                )
            splitter = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed + 7919 * (k + 1) + q)
            for j, (tr, te) in enumerate(splitter.split(rows, y[rows])):
                parts[j][0].append(rows[tr])
                parts[j][1].append(rows[te])
        inner.append([(np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))) for tr, te in parts])
    return outer, inner
