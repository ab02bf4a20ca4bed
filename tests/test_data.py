"""streamml.data: every validation error names file, row and field; merges; grouped splits."""

import json

import numpy as np
import pytest

from conftest import write_queries
from streamml.data import DataValidationError, cv_splits, load_queries, nested_splits


def row(text="a", label="accepted", dim=384, value=0.1):
    return {"text": text, "label": label, "embedding": [value] * dim}


def write(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(rows if isinstance(rows, str) else json.dumps(rows))


def valid_rows(n=3):
    return [row(f"acc {i}", "accepted") for i in range(n)] + [row(f"rej {i}", "rejected") for i in range(n)]


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"text": "a"}, r"bad\.json: expected a JSON list"),
        ("[1, 2", r"bad\.json: not valid JSON"),
        ([row(), {"label": "accepted", "embedding": [0.0] * 384}], r"bad\.json row 1: missing field 'text'"),
        ([row(), {"text": "b", "embedding": [0.0] * 384}], r"bad\.json row 1: missing field 'label'"),
        ([row(), {"text": "b", "label": "accepted"}], r"bad\.json row 1: missing field 'embedding'"),
        ([row(), row("b", label="liked")], r"bad\.json row 1 field 'label': unknown label 'liked'"),
        ([row(), row("b", dim=383)], r"bad\.json row 1 field 'embedding': expected 384 floats, got 383"),
        ([row(), row("b", value=float("nan"))], r"bad\.json row 1 field 'embedding': non-finite value at index 0"),
        ([row(), row("b", value="x")], r"bad\.json row 1 field 'embedding': not numeric"),
        ([row(), row("", "rejected")], r"bad\.json row 1 field 'text'"),
        ([row("a", "accepted"), row("b", "accepted")], r"bad\.json: query has no rejected sentence"),
        ([row("a", "rejected"), row("b", "rejected")], r"bad\.json: query has no accepted sentence"),
        ([row("a", "accepted"), row("b", "rejected"), row("a", "rejected")],
         r"bad\.json rows 0 and 2 field 'label': duplicate text with conflicting labels"),
    ],
)
def test_validation_errors_name_file_row_and_field(tmp_path, rows, message):
    write(tmp_path, "bad.json", rows)
    with pytest.raises(DataValidationError, match=message):
        load_queries(tmp_path, min_per_class=1)


def test_embedding_dim_comes_from_the_argument(tmp_path):
    write(tmp_path, "q.json", [row(dim=8), row("b", "rejected", dim=8)])
    assert load_queries(tmp_path, embedding_dim=8, min_per_class=1).X.shape == (2, 8)
    with pytest.raises(DataValidationError, match="expected 384 floats, got 8"):
        load_queries(tmp_path, min_per_class=1)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_queries(tmp_path / "nope")
    with pytest.raises(DataValidationError, match="no \\*.json query files"):
        load_queries(tmp_path)


def test_few_sentences_of_a_class_warn_but_load(tmp_path):
    write(tmp_path, "q.json", valid_rows(3))
    with pytest.warns(UserWarning, match=r"q\.json: only 3 accepted sentences \(< 20\)"):
        data = load_queries(tmp_path)
    assert len(data.frame) == 6


def test_duplicates_are_merged_and_counted(tmp_path):
    write(tmp_path, "q.json", valid_rows(3) + [row("acc 0", "accepted"), row("acc 0", "accepted"), row("rej 1", "rejected")])
    data = load_queries(tmp_path, min_per_class=1)
    assert len(data.frame) == 6 and data.n_duplicates == 3
    assert data.frame.set_index("text").loc["acc 0", "copies"] == 3


def test_query_ids_are_file_stems_and_rows_align(tmp_path):
    write_queries(tmp_path, n_queries=2, n_per_class=5)
    data = load_queries(tmp_path, min_per_class=1)
    assert data.query_ids == ["topic_0", "topic_1"]
    assert data.X.shape == (20, 384) and data.X.dtype == np.float32
    assert (data.frame.query_id == [data.query_ids[q] for q in data.query]).all()
    first = json.loads((tmp_path / "topic_1.json").read_text())[0]
    i = data.frame.index[data.frame.text == first["text"]][0]
    np.testing.assert_allclose(data.X[i], first["embedding"], rtol=1e-6)


def test_fingerprint_changes_with_the_data(tmp_path):
    write_queries(tmp_path, n_queries=2, n_per_class=5)
    before = load_queries(tmp_path, min_per_class=1).fingerprint
    assert load_queries(tmp_path, min_per_class=1).fingerprint == before
    write(tmp_path, "extra.json", valid_rows(2))
    assert load_queries(tmp_path, min_per_class=1).fingerprint != before


def test_splits_are_stratified_per_query_and_disjoint(tmp_path):
    write_queries(tmp_path, n_queries=3, n_per_class=10)
    data = load_queries(tmp_path, min_per_class=1)
    splits = cv_splits(data, n_folds=5, n_repeats=2, seed=0)
    assert len(splits) == 10
    for r in range(2):
        tests = np.concatenate([te for _, te in splits[5 * r : 5 * r + 5]])
        assert sorted(tests) == list(range(len(data.frame)))  # each repeat covers every row once
    for train, test in splits:
        assert not set(train) & set(test)
        for q in range(3):
            in_test = data.y[test][data.query[test] == q]
            assert (in_test == 1).sum() == 2 and (in_test == 0).sum() == 2


def test_splits_reject_too_few_of_a_class(tmp_path):
    write(tmp_path, "q.json", valid_rows(3))
    data = load_queries(tmp_path, min_per_class=1)
    with pytest.raises(DataValidationError, match="q: fewer than n_folds=5"):
        cv_splits(data, n_folds=5)


def test_duplicated_texts_of_the_real_data_never_straddle_a_split(shared_queries):
    data = load_queries(shared_queries, min_per_class=1)
    assert len(data.frame) == 443 and data.n_duplicates == 21
    for train, test in cv_splits(data):
        train_keys = set(zip(data.frame.query_id.iloc[train], data.frame.text.iloc[train]))
        assert not train_keys & set(zip(data.frame.query_id.iloc[test], data.frame.text.iloc[test]))


def with_duplicates(tmp_path):
    """Three queries where some texts appear two or three times in their file."""
    folder = write_queries(tmp_path / "q", n_queries=3, n_per_class=12)
    for path in folder.glob("*.json"):
        rows = json.loads(path.read_text())
        path.write_text(json.dumps(rows + rows[:3] + rows[-2:] + rows[:1]))
    return load_queries(folder, min_per_class=1)


def test_nested_inner_folds_partition_the_outer_train_and_never_see_its_test(tmp_path):
    data = with_duplicates(tmp_path)
    outer, inner = nested_splits(data, n_folds=3, n_repeats=2, inner_folds=3, seed=1)
    assert [(tr.tolist(), te.tolist()) for tr, te in outer] == [
        (tr.tolist(), te.tolist()) for tr, te in cv_splits(data, n_folds=3, n_repeats=2, seed=1)]
    assert len(inner) == 6 and all(len(part) == 3 for part in inner)
    for (outer_train, outer_test), part in zip(outer, inner):
        assert sorted(np.concatenate([te for _, te in part])) == sorted(outer_train)
        for train, test in part:
            assert not set(train) & set(test)
            assert not (set(train) | set(test)) & set(outer_test)
            for q in range(3):  # stratified: each inner test part holds both classes of every query
                assert set(data.y[test][data.query[test] == q]) == {0, 1}


def test_duplicated_texts_never_straddle_an_outer_or_inner_split(tmp_path):
    data = with_duplicates(tmp_path)
    assert data.n_duplicates == 3 * 6
    keys = list(zip(data.frame.query_id, data.frame.text))
    outer, inner = nested_splits(data, n_folds=3, n_repeats=1, inner_folds=2)
    for train, test in outer + [split for part in inner for split in part]:
        assert not {keys[i] for i in train} & {keys[i] for i in test}


def test_nested_splits_reject_too_few_of_a_class_for_the_inner_folds(tmp_path):
    write_queries(tmp_path, n_queries=1, n_per_class=6)
    data = load_queries(tmp_path, min_per_class=1)
    with pytest.raises(DataValidationError, match=r"topic_0: fewer than cv.inner_folds=5 .* outer split 0"):
        nested_splits(data, n_folds=3, n_repeats=1, inner_folds=5)
