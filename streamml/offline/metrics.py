"""Batched ranking metrics over padded slates, in the style of allRank.

A flat batch ``(scores, labels, groups)`` is turned by :func:`to_slates` into
padded (B, L) tensors, one row per group, plus a boolean ``mask`` of real items.
Every metric then returns one value per slate, (B,) or (B, len(ats)), so the
caller decides how to average over queries.

Conventions, each of them tested:

- Relevance is binary: ``y_true > 0`` counts as relevant (accepted).
- Padded positions never count: they are sorted after every real item and
  carry no gain.
- Ties in the scores are broken by position within the slate (a stable sort),
  which :func:`to_slates` keeps in input order. Only :func:`roc_auc` is
  tie-aware (a tie counts 1/2); NDCG, AP and precision@k see the stable order,
  so on tied scores they can differ from sklearn, which averages over ties.
- ``k`` larger than a slate means the whole slate.
- A slate with one class has no defined AUC: :func:`roc_auc` returns NaN, so a
  mean over slates must skip it (``torch.nanmean``).
- A slate with no relevant items scores 0 for NDCG (as sklearn's
  ``ndcg_score``), for AP and for precision@k.

The module depends on torch alone; tests check it against sklearn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamml.offline.slates import pad

__all__ = ["average_precision", "ndcg", "precision_at_k", "ranking_metrics", "roc_auc", "to_slates"]


def to_slates(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a flat batch into one row per group.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float scores.
    labels : torch.Tensor
        (N,) 0/1 labels.
    groups : torch.Tensor
        (N,) long group ids.

    Returns
    -------
    y_pred : torch.Tensor
        (B, L) scores, B = number of distinct groups in sorted id order,
        L = the longest slate; padding holds 0.
    y_true : torch.Tensor
        (B, L) float labels; padding holds 0.
    mask : torch.Tensor
        (B, L) bool, True at real items. Items keep their input order and sit
        at the start of their row.
    group_ids : torch.Tensor
        (B,) the group id of each row.

    Examples
    --------
    >>> import torch
    >>> y_pred, y_true, mask, ids = to_slates(
    ...     torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 0, 1]), torch.tensor([7, 3, 7]))
    >>> y_pred
    tensor([[0.2000, 0.0000],
            [0.1000, 0.3000]])
    >>> mask
    tensor([[ True, False],
            [ True,  True]])
    >>> ids
    tensor([3, 7])
    """
    slates = pad(torch.stack([scores.detach(), labels.to(scores.dtype)], -1), groups)  # (B, L, 2)
    return slates.padded[..., 0], slates.padded[..., 1], slates.mask, slates.group_ids


def _relevance_by_rank(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary relevance (B, L) reordered by descending score, padding last, ties in position order."""
    order = torch.sort(y_pred, dim=-1, descending=True, stable=True).indices
    # A second stable sort moves padding behind every real item, even one scored -inf.
    order = order.gather(-1, torch.sort((~mask).gather(-1, order).int(), dim=-1, stable=True).indices)
    return ((y_true > 0) & mask).gather(-1, order).float()


def roc_auc(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of each slate (the Mann-Whitney U statistic).

    The fraction of (relevant, non-relevant) pairs that the scores order
    correctly, a tie counting 1/2; this matches ``sklearn.metrics.roc_auc_score``.

    Parameters
    ----------
    y_pred : torch.Tensor
        (B, L) float scores.
    y_true : torch.Tensor
        (B, L) labels, relevant where > 0.
    mask : torch.Tensor
        (B, L) bool, True at real items.

    Returns
    -------
    torch.Tensor
        (B,) AUC per slate; NaN for a slate with only one class (no pairs).

    Examples
    --------
    >>> import torch
    >>> mask = torch.ones(2, 3, dtype=torch.bool)
    >>> roc_auc(torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]]),
    ...         torch.tensor([[0, 1, 0], [1, 0, 1]]), mask)
    tensor([0.5000, 0.2500])
    """
    relevant, other = mask & (y_true > 0), mask & ~(y_true > 0)
    n_rel, n_other = relevant.sum(-1), other.sum(-1)  # (B,)
    # Non-relevant scores sorted ascending, everything else pushed to the end as +inf.
    other_sorted = y_pred.masked_fill(~other, float("inf")).sort(dim=-1).values.contiguous()
    values = y_pred.contiguous()
    below = torch.searchsorted(other_sorted, values)  # (B, L) non-relevant scored strictly lower
    # Clamp so that the +inf filler never counts as a tie (matters only for scores of +inf).
    below_or_tied = torch.minimum(torch.searchsorted(other_sorted, values, right=True), n_other[:, None])
    wins = (below + below_or_tied) / 2  # ties count 1/2
    return (wins * relevant).sum(-1) / (n_rel * n_other)


def ndcg(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor, ats: Sequence[int]) -> torch.Tensor:
    """Normalised discounted cumulative gain at each k in ``ats``.

    DCG@k sums ``rel / log2(rank + 1)`` over the top k items, with binary
    ``rel`` (so equal to the ``2**rel - 1`` gain); NDCG divides by the DCG@k
    of the ideal order.

    Parameters
    ----------
    y_pred : torch.Tensor
        (B, L) float scores.
    y_true : torch.Tensor
        (B, L) labels, relevant where > 0.
    mask : torch.Tensor
        (B, L) bool, True at real items.
    ats : sequence of int
        Cut-offs k >= 1; a k beyond a slate's length uses the whole slate.

    Returns
    -------
    torch.Tensor
        (B, len(ats)); 0 for a slate with no relevant items.

    Examples
    --------
    >>> import torch
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> ndcg(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0, 1, 0]]), mask, ats=[1, 2, 10])
    tensor([[0.0000, 0.6309, 0.6309]])
    """
    rel = _relevance_by_rank(y_pred, y_true, mask)  # (B, L)
    ideal = rel.sort(dim=-1, descending=True).values  # (B, L)
    length = rel.shape[-1]
    discounts = 1 / torch.log2(torch.arange(length, dtype=rel.dtype, device=rel.device) + 2)  # (L,)
    # (K,) columns to read; past a slate's end its padding adds no gain, so k > length means the whole slate.
    cols = torch.tensor([min(k, length) - 1 for k in ats], device=rel.device)
    dcg = (rel * discounts).cumsum(-1)[:, cols]  # (B, K)
    idcg = (ideal * discounts).cumsum(-1)[:, cols]  # (B, K)
    return torch.where(idcg > 0, dcg / idcg, 0.0)


def average_precision(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average precision of each slate: the mean of precision@rank over the relevant items' ranks.

    On tie-free scores this equals ``sklearn.metrics.average_precision_score``.
    The mean over slates is MAP.

    Parameters
    ----------
    y_pred : torch.Tensor
        (B, L) float scores.
    y_true : torch.Tensor
        (B, L) labels, relevant where > 0.
    mask : torch.Tensor
        (B, L) bool, True at real items.

    Returns
    -------
    torch.Tensor
        (B,); 0 for a slate with no relevant items (never NaN).

    Examples
    --------
    >>> import torch
    >>> mask = torch.ones(1, 3, dtype=torch.bool)
    >>> average_precision(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1, 0, 1]]), mask)
    tensor([0.8333])
    """
    rel = _relevance_by_rank(y_pred, y_true, mask)  # (B, L)
    ranks = torch.arange(1, rel.shape[-1] + 1, device=rel.device)  # (L,)
    precision = rel.cumsum(-1) / ranks  # (B, L) precision at each rank
    return (precision * rel).sum(-1) / rel.sum(-1).clamp(min=1)


def precision_at_k(
    y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor, ats: Sequence[int]
) -> torch.Tensor:
    """Fraction of relevant items among the top ``min(k, slate length)`` of each slate.

    Parameters
    ----------
    y_pred : torch.Tensor
        (B, L) float scores.
    y_true : torch.Tensor
        (B, L) labels, relevant where > 0.
    mask : torch.Tensor
        (B, L) bool, True at real items.
    ats : sequence of int
        Cut-offs k >= 1.

    Returns
    -------
    torch.Tensor
        (B, len(ats)); 0 for a slate with no relevant items.

    Examples
    --------
    >>> import torch
    >>> mask = torch.tensor([[True, True, True, False]])
    >>> y_pred, y_true = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[1, 0, 1, 0]])
    >>> precision_at_k(y_pred, y_true, mask, ats=[1, 2, 5])
    tensor([[1.0000, 0.5000, 0.6667]])
    """
    hits = _relevance_by_rank(y_pred, y_true, mask).cumsum(-1)  # (B, L)
    lengths = mask.sum(-1, keepdim=True)  # (B, 1)
    k = torch.minimum(torch.tensor(list(ats), device=mask.device)[None, :], lengths).clamp(min=1)  # (B, K)
    return hits.gather(-1, k - 1) / k


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every ranking metric per group of a flat batch.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float scores.
    labels : torch.Tensor
        (N,) 0/1 labels.
    groups : torch.Tensor
        (N,) long group ids.

    Returns
    -------
    dict of str to torch.Tensor
        Keys ``auc``, ``ndcg_at_5``, ``ndcg_at_10``, ``map`` (per-group AP),
        ``precision_at_5``, each (B,), and ``groups``, the (B,) ids in sorted
        order. ``auc`` is NaN for single-class groups.

    Examples
    --------
    >>> import torch
    >>> m = ranking_metrics(torch.tensor([0.9, 0.1, 0.4, 0.8]), torch.tensor([1, 0, 1, 0]),
    ...                     torch.tensor([0, 0, 1, 1]))
    >>> m["auc"], m["map"], m["groups"]
    (tensor([1., 0.]), tensor([1.0000, 0.5000]), tensor([0, 1]))
    """
    y_pred, y_true, mask, group_ids = to_slates(scores, labels, groups)
    ndcgs = ndcg(y_pred, y_true, mask, ats=(5, 10))  # (B, 2)
    return {
        "auc": roc_auc(y_pred, y_true, mask),
        "ndcg_at_5": ndcgs[:, 0],
        "ndcg_at_10": ndcgs[:, 1],
        "map": average_precision(y_pred, y_true, mask),
        "precision_at_5": precision_at_k(y_pred, y_true, mask, ats=(5,))[:, 0],
        "groups": group_ids,
    }
