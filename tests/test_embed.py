"""streamml.embed: input validation, the query format it writes, and the shipped dataset.

Tests that load all-MiniLM-L6-v2 are marked slow; the rest replace ``embed_texts``.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamml import embed

REPO = Path(__file__).resolve().parents[1]
QUERY_FILES = sorted((REPO / "data" / "queries").glob("*.json"))


def fake_embed(texts):
    """Unit vectors that differ per text, so row order is checkable without the model."""
    rng = np.random.default_rng([len(t) for t in texts])
    emb = rng.normal(size=(len(texts), embed.EMBEDDING_DIM))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def refuse_embed(texts):
    raise AssertionError("embed_texts called on invalid input")


def write_json(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


GOOD = {"text": "Rocket reaches orbit on third attempt", "label": "accepted"}


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[{", "not valid JSON"),
        ({"rows": [GOOD]}, "expected a JSON list"),
        ([], "no rows"),
        ([GOOD, "just a string"], "row 1: expected an object"),
        ([GOOD, {"label": "accepted"}], "row 1: missing field 'text'"),
        ([GOOD, {"text": "Launch delayed"}], "row 1: missing field 'label'"),
        ([GOOD, {"text": "  ", "label": "rejected"}], "row 1 field 'text'"),
        ([GOOD, {"text": 7, "label": "rejected"}], "row 1 field 'text'"),
        ([GOOD, {"text": "Launch delayed", "label": "maybe"}], "row 1 field 'label': unknown label 'maybe'"),
    ],
)
def test_invalid_input_names_file_row_and_field(tmp_path, monkeypatch, content, expected):
    monkeypatch.setattr(embed, "embed_texts", refuse_embed)
    path = write_json(tmp_path / "bad_query.json", content)
    with pytest.raises(ValueError, match="bad_query.json") as err:
        embed.embed_file(path, tmp_path / "out")
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_validates_every_input_before_embedding(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embed, "embed_texts", refuse_embed)
    good = write_json(tmp_path / "good.json", [GOOD])
    bad = write_json(tmp_path / "bad.json", [GOOD, GOOD, {"text": "x", "label": "clicked"}])
    with pytest.raises(SystemExit) as exit_:
        embed.main([str(good), str(bad), "--out-dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "bad.json row 2 field 'label'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_an_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embed, "embed_texts", refuse_embed)
    path = write_json(tmp_path / "q.json", [GOOD])
    with pytest.raises(SystemExit):
        embed.main([str(path), "--out-dir", str(tmp_path)])
    assert "overwrite the input" in capsys.readouterr().err
    assert json.loads(path.read_text()) == [GOOD]


def test_embed_file_writes_query_format(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "embed_texts", fake_embed)
    rows = [GOOD, {"text": "Orbitra Aerospace Celebrates Its Anniversary", "label": "rejected", "id": 3}]
    out = embed.embed_file(write_json(tmp_path / "space.json", rows), tmp_path / "queries")
    assert out == tmp_path / "queries" / "space.json"
    written = json.loads(out.read_text())
    assert [{k: r[k] for k in ("text", "label")} for r in written] == [{k: r[k] for k in ("text", "label")} for r in rows]
    assert all(set(r) == {"text", "label", "embedding"} for r in written)
    expected = fake_embed([r["text"] for r in rows])
    assert cosine([r["embedding"] for r in written], expected).min() >= 0.99999


def test_round_sig_keeps_seven_digits_and_the_direction():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(200, embed.EMBEDDING_DIM)) * rng.uniform(1e-4, 1, size=(200, 1))
    rounded = np.array([embed.round_sig(v) for v in vecs])
    assert cosine(rounded, vecs).min() >= 0.99999
    assert np.abs(rounded - vecs).max() <= 5e-7 * np.abs(vecs).max()
    assert all(float(f"{v:.7g}") == v for v in rounded.ravel())


def test_missing_text_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install \.\[text\]"):
        embed._model.__wrapped__()


def test_default_dataset_is_present():
    assert len(QUERY_FILES) >= 6
    sources = {p.stem for p in (REPO / "data" / "text").glob("*.json")}
    assert sources == {p.stem for p in QUERY_FILES}


@pytest.mark.parametrize("path", QUERY_FILES, ids=[p.stem for p in QUERY_FILES])
def test_query_file_matches_its_source(path):
    rows = json.loads(path.read_text())
    source = embed.load_rows(REPO / "data" / "text" / path.name)
    assert [{"text": r["text"], "label": r["label"]} for r in rows] == source
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    for label in embed.LABELS:
        assert sum(r["label"] == label for r in rows) >= 20
    emb = np.array([r["embedding"] for r in rows], dtype=np.float64)
    assert emb.shape == (len(rows), embed.EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_embeddings_reproduce_the_shared_query_files(shared_queries):
    pytest.importorskip("sentence_transformers", reason="needs the text extra: pip install .[text]")
    path = shared_queries / "query_1.json"
    rows = json.loads(path.read_text())[:3]
    emb = embed.embed_texts([r["text"] for r in rows])
    assert emb.shape == (3, embed.EMBEDDING_DIM) and emb.dtype == np.float32
    assert cosine(emb, [r["embedding"] for r in rows]).min() > 0.9999


@pytest.mark.slow
def test_cli_round_trip(tmp_path):
    pytest.importorskip("sentence_transformers", reason="needs the text extra: pip install .[text]")
    rows = [
        {"text": "Central bank raises rates by half a point to fight inflation", "label": "accepted"},
        {"text": "Download our free guide to saving money when rates rise", "label": "rejected"},
        {"text": "Mortgage rates top 7% for the first time in two decades", "label": "accepted"},
    ]
    src = write_json(tmp_path / "rates.json", rows)
    result = subprocess.run(
        [sys.executable, "-m", "streamml.embed", str(src), "--out-dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out" / "rates.json").read_text())
    assert [{"text": r["text"], "label": r["label"]} for r in written] == rows
    emb = np.array([r["embedding"] for r in written])
    assert emb.shape == (3, embed.EMBEDDING_DIM)
    assert cosine(emb, embed.embed_texts([r["text"] for r in rows])).min() >= 0.99999
