"""Padding a flat batch into one row per group (slate), vectorised.

Training batches, MLP heads and metrics all see rows of many groups mixed together.
Padding them into (B, L, ...) slates turns per-group work (pairs inside a query, a
matmul with that group's weights, a per-query sort) into batched tensor ops, with
memory that grows with B·L rather than with N² or N·D·H. Depends on torch alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Slates(NamedTuple):
    padded: torch.Tensor  # (B, L, *rest), zeros at padding
    mask: torch.Tensor  # (B, L) bool, True at real items
    row: torch.Tensor  # (N,) slate of each input item
    col: torch.Tensor  # (N,) position of each input item in its slate
    group_ids: torch.Tensor  # (B,) sorted distinct group ids


def pad(values: torch.Tensor, groups: torch.Tensor) -> Slates:
    """Place item ``i`` at ``padded[row[i], col[i]]``; items keep their input order.

    Gradients flow from ``padded`` back to ``values``.

    Examples
    --------
    >>> s = pad(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([7, 3, 7]))
    >>> s.padded
    tensor([[0.2000, 0.0000],
            [0.1000, 0.3000]])
    >>> s.group_ids
    tensor([3, 7])
    >>> bool((s.padded[s.row, s.col] == torch.tensor([0.1, 0.2, 0.3])).all())
    True
    """
    group_ids, row, counts = torch.unique(groups, return_inverse=True, return_counts=True)  # (B,), (N,), (B,)
    order = torch.argsort(row, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # (B,) first index of each slate in `order`
    col = torch.empty_like(row)
    col[order] = torch.arange(len(row), device=row.device) - starts[row[order]]
    length = int(counts.max()) if len(counts) else 0
    padded = values.new_zeros((len(group_ids), length, *values.shape[1:]))
    padded = padded.index_put((row, col), values)
    mask = torch.zeros((len(group_ids), length), dtype=torch.bool, device=values.device)
    mask[row, col] = True
    return Slates(padded, mask, row, col, group_ids)
