"""Per-query scoring heads over frozen embeddings, vectorised over queries.

Preferences are specific to each query (a model trained on the other queries scores at
chance), so every query gets its own head. Keeping all heads as one stacked parameter
tensor lets a single forward pass score a batch that mixes queries, with no Python loop.
The "group" index selects the head; during cross-validation a group is one
(fold, query) pair, so all folds train together in one fit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from streamml.offline.slates import pad


class LinearHeads(nn.Module):
    """``score = w_g · x + b_g`` for group ``g``.

    Examples
    --------
    >>> heads = LinearHeads(n_groups=3, dim=4)
    >>> heads(torch.ones(5, 4), torch.tensor([0, 1, 2, 2, 0])).shape
    torch.Size([5])
    """

    def __init__(self, n_groups: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_groups, dim))
        self.bias = nn.Parameter(torch.zeros(n_groups))

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        # x (B, D), group (B,) -> (B,)
        return (x * self.weight[group]).sum(-1) + self.bias[group]


class MLPHeads(nn.Module):
    """One hidden layer per group: ``w2_g · act(W1_g x + b1_g) + b2_g``.

    Examples
    --------
    >>> heads = MLPHeads(n_groups=2, dim=4, hidden=8)
    >>> heads(torch.randn(3, 4), torch.tensor([0, 1, 1])).shape
    torch.Size([3])
    """

    def __init__(self, n_groups: int, dim: int, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.w1 = nn.Parameter(torch.empty(n_groups, dim, hidden).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(n_groups, hidden))
        self.w2 = nn.Parameter(torch.empty(n_groups, hidden).uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden)))
        self.b2 = nn.Parameter(torch.zeros(n_groups))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        # Gathering W1 per row would copy (B, D, H); padding rows into per-group slates
        # and using one bmm keeps memory at (G, L, D).
        s = pad(x, group)  # (G', L, D) over the groups present in the batch
        h = torch.relu(torch.bmm(s.padded, self.w1[s.group_ids]) + self.b1[s.group_ids, None, :])  # (G', L, H)
        h = self.dropout(h)[s.row, s.col]  # (B, H)
        return (h * self.w2[group]).sum(-1) + self.b2[group]
