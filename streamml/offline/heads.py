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


class MultiTaskHeads(nn.Module):
    """Per-group heads over a projection shared by the groups of one block.

    ``score = a_g · act(P_b x) + v_g · x + c_g``, where ``b`` is the block of group ``g``.
    With ~44 texts per query in 384 dimensions each query alone is a small problem; the
    projection ``P_b`` (D -> rank) is learned from every query of the block at once, so a
    query's head needs only ``rank`` weights on top of it (plus, with ``own=True``, a full
    per-group linear term ``v_g`` that lets a query keep what the shared part misses).
    ``activation="relu"`` makes the shared part a hidden layer shared by all queries
    (hard parameter sharing); ``"identity"`` a low-rank linear head ``w_g = P_bᵀ a_g + v_g``.

    During cross-validation a group is a (split, query) pair and a block is a split, so
    sharing runs across the queries of one split only: no split learns from another
    split's test rows. Outside CV every group is in block 0.

    Parameters
    ----------
    n_groups, dim
        Number of heads and the input dimension.
    rank
        Width of the shared projection.
    blocks : tensor of int, optional
        (n_groups,) block of each group, values ``0..n_blocks-1``; None puts all in one block.
    own
        Add the per-group linear term ``v_g · x``.
    activation
        ``"identity"`` or ``"relu"``, applied to the shared projection.

    Examples
    --------
    >>> heads = MultiTaskHeads(n_groups=4, dim=6, rank=3, blocks=torch.tensor([0, 0, 1, 1]))
    >>> heads(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 3])).shape
    torch.Size([5])
    """

    def __init__(self, n_groups: int, dim: int, rank: int = 16, blocks: torch.Tensor | None = None,
                 own: bool = True, activation: str = "identity"):
        super().__init__()
        if activation not in ("identity", "relu"):
            raise ValueError(f"activation must be 'identity' or 'relu', got {activation!r}")
        blocks = torch.zeros(n_groups, dtype=torch.long) if blocks is None else torch.as_tensor(blocks, dtype=torch.long)
        if blocks.shape != (n_groups,):
            raise ValueError(f"blocks must have shape ({n_groups},), got {tuple(blocks.shape)}")
        n_blocks = int(blocks.max()) + 1 if n_groups else 0
        self.register_buffer("blocks", blocks)
        self.activation = activation
        bound = 1 / math.sqrt(dim)
        self.projection = nn.Parameter(torch.empty(n_blocks, dim, rank).uniform_(-bound, bound))  # P_b
        self.bias = nn.Parameter(torch.zeros(n_blocks, rank))
        self.weight = nn.Parameter(torch.empty(n_groups, rank).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank)))  # a_g
        self.own = nn.Parameter(torch.zeros(n_groups, dim)) if own else None  # v_g
        self.offset = nn.Parameter(torch.zeros(n_groups))  # c_g

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        # x (B, D), group (B,) -> (B,); one bmm per block present, as in MLPHeads.
        s = pad(x, self.blocks[group])  # (K', L, D) over the blocks present in the batch
        h = torch.bmm(s.padded, self.projection[s.group_ids]) + self.bias[s.group_ids, None, :]  # (K', L, R)
        if self.activation == "relu":
            h = torch.relu(h)
        h = h[s.row, s.col]  # (B, R)
        score = (h * self.weight[group]).sum(-1) + self.offset[group]
        if self.own is not None:
            score = score + (x * self.own[group]).sum(-1)
        return score
