import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score, roc_auc_score

from streamml.offline.metrics import average_precision, ndcg, precision_at_k, ranking_metrics, roc_auc, to_slates

LENGTHS = [2, 3, 5, 8, 13, 40]
ATS = [1, 3, 5, 10, 100]


def flat_batch(seed, lengths=LENGTHS, ties=False):
    """Random (scores, labels, groups) with shuffled items, each group holding both classes."""
    rng = np.random.default_rng(seed)
    labels = []
    for n in lengths:
        y = rng.integers(0, 2, n)
        y[:2] = [1, 0]
        labels.append(rng.permutation(y))
    labels = np.concatenate(labels)
    groups = np.repeat(np.arange(len(lengths)) * 10 + 5, lengths)  # ids 5, 15, 25, ...
    # Tie-free: a permutation of distinct values; with ties: a handful of integer levels.
    scores = rng.integers(0, 3, len(labels)).astype(float) if ties else rng.permutation(len(labels)) / 7.0
    perm = rng.permutation(len(labels))
    return torch.tensor(scores[perm]), torch.tensor(labels[perm]), torch.tensor(groups[perm])


def per_group(scores, labels, groups):
    """(scores, labels) as numpy arrays for each group, in sorted id order."""
    return [(scores[groups == g].numpy(), labels[groups == g].numpy()) for g in torch.unique(groups)]


def hand_precision_at_k(s, y, k):
    top = np.argsort(-s, kind="stable")[: min(k, len(s))]
    return y[top].mean()


@pytest.fixture(params=[0, 1, 2, 3])
def batch(request):
    scores, labels, groups = flat_batch(request.param)
    return scores, labels, groups, to_slates(scores, labels, groups)


# to_slates


def test_to_slates_pads_groups_in_sorted_id_order_keeping_input_order():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    labels = torch.tensor([1, 0, 1, 1, 0])
    groups = torch.tensor([9, 2, 9, 9, 2])
    y_pred, y_true, mask, ids = to_slates(scores, labels, groups)
    torch.testing.assert_close(y_pred, torch.tensor([[0.2, 0.5, 0.0], [0.1, 0.3, 0.4]]))
    torch.testing.assert_close(y_true, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    assert ids.tolist() == [2, 9]


def test_to_slates_round_trips_every_item(batch):
    scores, labels, groups, (y_pred, y_true, mask, ids) = batch
    assert y_pred.shape == (len(LENGTHS), max(LENGTHS))
    assert mask.sum(-1).tolist() == LENGTHS
    for row, (s, y) in enumerate(per_group(scores, labels, groups)):
        np.testing.assert_array_equal(y_pred[row][mask[row]].numpy(), s)
        np.testing.assert_array_equal(y_true[row][mask[row]].numpy(), y)
    assert not y_pred.requires_grad


def test_to_slates_detaches_scores():
    scores = torch.tensor([0.5, 0.1], requires_grad=True)
    y_pred, *_ = to_slates(scores, torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert not y_pred.requires_grad


# every metric against sklearn on random tie-free slates of different lengths


def test_roc_auc_matches_sklearn(batch):
    scores, labels, groups, (y_pred, y_true, mask, _) = batch
    expected = [roc_auc_score(y, s) for s, y in per_group(scores, labels, groups)]
    np.testing.assert_allclose(roc_auc(y_pred, y_true, mask).numpy(), expected, rtol=1e-6)


def test_ndcg_matches_sklearn(batch):
    scores, labels, groups, (y_pred, y_true, mask, _) = batch
    expected = [[ndcg_score(y[None], s[None], k=k) for k in ATS] for s, y in per_group(scores, labels, groups)]
    values = ndcg(y_pred, y_true, mask, ATS)
    assert values.shape == (len(LENGTHS), len(ATS))
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-5)


def test_average_precision_matches_sklearn(batch):
    scores, labels, groups, (y_pred, y_true, mask, _) = batch
    expected = [average_precision_score(y, s) for s, y in per_group(scores, labels, groups)]
    np.testing.assert_allclose(average_precision(y_pred, y_true, mask).numpy(), expected, rtol=1e-5)


def test_precision_at_k_matches_hand_computation(batch):
    scores, labels, groups, (y_pred, y_true, mask, _) = batch
    expected = [[hand_precision_at_k(s, y, k) for k in ATS] for s, y in per_group(scores, labels, groups)]
    values = precision_at_k(y_pred, y_true, mask, ATS)
    assert values.shape == (len(LENGTHS), len(ATS))
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-6)


def test_roc_auc_counts_ties_as_half_like_sklearn():
    scores, labels, groups = flat_batch(seed=5, ties=True)
    y_pred, y_true, mask, _ = to_slates(scores, labels, groups)
    expected = [roc_auc_score(y, s) for s, y in per_group(scores, labels, groups)]
    np.testing.assert_allclose(roc_auc(y_pred, y_true, mask).numpy(), expected, rtol=1e-6)


def test_roc_auc_hand_cases():
    mask = torch.ones(3, 2, dtype=torch.bool)
    y_pred = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    y_true = torch.tensor([[1, 0], [1, 0], [1, 0]])
    assert roc_auc(y_pred, y_true, mask).tolist() == [1.0, 0.0, 0.5]


def test_roc_auc_infinite_scores_do_not_tie_with_padding():
    y_pred = torch.tensor([[math.inf, 0.0, 0.0], [math.inf, math.inf, 0.0]])
    y_true = torch.tensor([[1, 0, 0], [1, 0, 0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert roc_auc(y_pred, y_true, mask).tolist() == [1.0, 0.5]


# edge cases


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_single_class_slate_auc_is_nan(labels):
    y_pred = torch.tensor([[0.3, 0.1, 0.2], [0.3, 0.1, 0.2]])
    y_true = torch.tensor([labels, [1, 0, 1]])
    auc = roc_auc(y_pred, y_true, torch.ones(2, 3, dtype=torch.bool))
    assert math.isnan(auc[0].item())
    assert auc[1].item() == 1.0


def test_no_relevant_items_scores_zero_not_nan():
    y_pred = torch.tensor([[0.3, 0.1, 0.2]])
    y_true = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert ndcg(y_pred, y_true, mask, ATS).tolist() == [[0.0] * len(ATS)]
    assert ndcg_score(y_true.numpy(), y_pred.numpy(), k=3) == 0.0  # the convention we follow
    assert average_precision(y_pred, y_true, mask).tolist() == [0.0]
    assert precision_at_k(y_pred, y_true, mask, ATS).tolist() == [[0.0] * len(ATS)]


def test_padding_never_counts():
    # The same 3-item slate alone, and padded with positions that would top every ranking if counted.
    alone = (torch.tensor([[0.2, 0.9, 0.5]]), torch.tensor([[1.0, 0.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool))
    y_pred = torch.tensor([[0.2, 0.9, 0.5, 100.0, 100.0]])
    y_true = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False, False]])
    padded = (y_pred, y_true, mask)
    for metric in (roc_auc, average_precision):
        torch.testing.assert_close(metric(*padded), metric(*alone))
    for metric in (ndcg, precision_at_k):
        torch.testing.assert_close(metric(*padded, ATS), metric(*alone, ATS))
    assert average_precision(*alone).item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_padding_sorts_after_real_items_scored_minus_inf():
    y_pred = torch.tensor([[0.0, -math.inf, 0.0]])
    y_true = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert precision_at_k(y_pred, y_true, mask, [2]).item() == pytest.approx(0.5)
    assert ndcg(y_pred, y_true, mask, [2]).item() == pytest.approx(1 / math.log2(3))
    assert average_precision(y_pred, y_true, mask).item() == pytest.approx(0.5)


def test_k_larger_than_slate_uses_whole_slate():
    y_pred = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.0]])
    y_true = torch.tensor([[1, 0, 0], [0, 1, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    whole = [ndcg_score(np.array([[1, 0, 0]]), np.array([[0.1, 0.9, 0.5]])), ndcg_score([[0, 1]], [[0.3, 0.2]])]
    np.testing.assert_allclose(ndcg(y_pred, y_true, mask, [3, 50]).numpy(), [[whole[0]] * 2, [whole[1]] * 2])
    # Precision divides by the slate's own length: 1/3 and 1/2, not 1/50.
    np.testing.assert_allclose(precision_at_k(y_pred, y_true, mask, [50]).numpy(), [[1 / 3], [1 / 2]])


def test_ties_are_broken_by_position():
    y_pred = torch.zeros(2, 2)
    y_true = torch.tensor([[1, 0], [0, 1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert ndcg(y_pred, y_true, mask, [1]).tolist() == [[1.0], [0.0]]
    assert precision_at_k(y_pred, y_true, mask, [1]).tolist() == [[1.0], [0.0]]
    assert roc_auc(y_pred, y_true, mask).tolist() == [0.5, 0.5]  # AUC alone is tie-aware


# ranking_metrics


def test_ranking_metrics_keys_and_values(batch):
    scores, labels, groups, (y_pred, y_true, mask, ids) = batch
    metrics = ranking_metrics(scores.requires_grad_(), labels, groups)
    assert set(metrics) == {"auc", "ndcg_at_5", "ndcg_at_10", "map", "precision_at_5", "groups"}
    assert all(v.shape == (len(LENGTHS),) for v in metrics.values())
    assert metrics["groups"].tolist() == [5, 15, 25, 35, 45, 55]
    torch.testing.assert_close(metrics["auc"], roc_auc(y_pred, y_true, mask))
    torch.testing.assert_close(metrics["ndcg_at_5"], ndcg(y_pred, y_true, mask, [5])[:, 0])
    torch.testing.assert_close(metrics["ndcg_at_10"], ndcg(y_pred, y_true, mask, [10])[:, 0])
    torch.testing.assert_close(metrics["map"], average_precision(y_pred, y_true, mask))
    torch.testing.assert_close(metrics["precision_at_5"], precision_at_k(y_pred, y_true, mask, [5])[:, 0])
