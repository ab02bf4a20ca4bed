"""Training losses for per-query scoring heads.

Every loss is a pure function ``loss(scores, labels, groups, **kw) -> scalar``
over a flat batch of N items, in the spirit of allRank:

- ``scores`` (N,) float: the model's scores (logits).
- ``labels`` (N,) 0/1, float or int: 1 means the item was accepted.
- ``groups`` (N,) long: the slate each item belongs to, i.e. one (fold, query)
  head. Pairwise losses only compare items of the same group, because scores of
  different queries live on unrelated scales.

The batch stays flat, so it may mix slates of any length; pairs are formed on
(B, L, L) padded slates (see :mod:`streamml.offline.slates`), which costs B·L² rather
than N², and no Python loop runs over groups.

A batch with no valid pair (every group single-class) gives a zero that still
carries a ``grad_fn``, so ``loss.backward()`` works unchanged on it.

Losses are chosen by name through the explicit ``LOSSES`` registry and
:func:`get_loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamml.offline.slates import pad

__all__ = ["LOSSES", "bce", "get_loss", "margin", "ranknet"]


def _pair_differences(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Differences ``s_i - s_j`` over all pairs where item i should outrank item j, shape (P,).

    A pair (i, j) is valid when ``groups[i] == groups[j]`` and ``labels[i] > labels[j]``
    (for 0/1 labels: i accepted, j not).
    """
    s = pad(torch.stack([scores, labels.to(scores.dtype)], -1), groups)  # (B, L, 2)
    y_pred, y_true = s.padded[..., 0], s.padded[..., 1]
    valid = (y_true[:, :, None] > y_true[:, None, :]) & s.mask[:, :, None] & s.mask[:, None, :]  # (B, L, L)
    return (y_pred[:, :, None] - y_pred[:, None, :])[valid]


def _mean_or_zero(values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    # With no pairs, .mean() would be NaN; a zero tied to scores keeps backward() working.
    return values.mean() if values.numel() else scores.sum() * 0


def ranknet(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic loss of RankNet (Burges et al., 2005, "Learning to Rank using Gradient Descent").

    The mean, over every within-group pair (i, j) with ``labels[i] = 1`` and
    ``labels[j] = 0``, of ``softplus(-(s_i - s_j)) = log(1 + exp(-(s_i - s_j)))``.
    This equals binary cross-entropy with logits on ``s_i - s_j`` and target 1.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float scores.
    labels : torch.Tensor
        (N,) 0/1 labels, 1 = accepted.
    groups : torch.Tensor
        (N,) long group ids; pairs never cross groups.

    Returns
    -------
    torch.Tensor
        Scalar loss; 0 (with a ``grad_fn``) when there are no valid pairs.

    Examples
    --------
    >>> import torch
    >>> ranknet(torch.tensor([2.0, 0.0]), torch.tensor([1, 0]), torch.tensor([0, 0]))
    tensor(0.1269)
    >>> ranknet(torch.tensor([2.0, 0.0]), torch.tensor([1, 0]), torch.tensor([0, 1]))
    tensor(0.)
    """
    return _mean_or_zero(F.softplus(-_pair_differences(scores, labels, groups)), scores)


def margin(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Pairwise hinge loss (as in RankSVM, Herbrich et al., 2000; Joachims, 2002).

    The mean, over the same pairs as :func:`ranknet`, of
    ``relu(margin - (s_i - s_j))``: zero once the accepted item leads by at
    least ``margin``.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float scores.
    labels : torch.Tensor
        (N,) 0/1 labels, 1 = accepted.
    groups : torch.Tensor
        (N,) long group ids; pairs never cross groups.
    margin : float, default 1.0
        The lead below which a pair is penalised.

    Returns
    -------
    torch.Tensor
        Scalar loss; 0 (with a ``grad_fn``) when there are no valid pairs.

    Examples
    --------
    >>> import torch
    >>> labels, groups = torch.tensor([1, 0]), torch.tensor([0, 0])
    >>> margin(torch.tensor([0.25, 0.0]), labels, groups)
    tensor(0.7500)
    >>> margin(torch.tensor([2.0, 0.0]), labels, groups)
    tensor(0.)
    """
    return _mean_or_zero(F.relu(margin - _pair_differences(scores, labels, groups)), scores)


def bce(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Pointwise binary cross-entropy with logits: the non-ranking control.

    Parameters
    ----------
    scores : torch.Tensor
        (N,) float logits.
    labels : torch.Tensor
        (N,) 0/1 labels, 1 = accepted.
    groups : torch.Tensor
        (N,) long group ids, ignored; kept so every loss shares one signature.

    Returns
    -------
    torch.Tensor
        Scalar mean BCE over the N items.

    Examples
    --------
    >>> import torch
    >>> bce(torch.tensor([0.0, 0.0]), torch.tensor([1, 0]), torch.tensor([0, 0]))
    tensor(0.6931)
    """
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"ranknet": ranknet, "margin": margin, "bce": bce}


def get_loss(name: str, **kw) -> functools.partial:
    """Look up a loss by name and bind its keyword arguments.

    Parameters
    ----------
    name : str
        A key of :data:`LOSSES`.
    **kw
        Keyword arguments bound to the loss, e.g. ``margin=0.5``.

    Returns
    -------
    functools.partial
        Callable as ``loss(scores, labels, groups)``.

    Raises
    ------
    ValueError
        If ``name`` is not a known loss.

    Examples
    --------
    >>> import torch
    >>> loss = get_loss("margin", margin=0.5)
    >>> loss(torch.tensor([0.25, 0.0]), torch.tensor([1, 0]), torch.tensor([0, 0]))
    tensor(0.2500)
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return functools.partial(LOSSES[name], **kw)
