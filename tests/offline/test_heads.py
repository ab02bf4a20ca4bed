"""streamml.offline.heads: vectorised heads equal a loop over per-group models."""

import pytest
import torch

from streamml.offline.heads import LinearHeads, MLPHeads


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(11, 6), torch.tensor([2, 0, 1, 2, 0, 0, 1, 2, 2, 0, 1])


def test_linear_heads_match_per_group_dot_products(batch):
    x, g = batch
    heads = LinearHeads(3, 6)
    torch.nn.init.normal_(heads.weight), torch.nn.init.normal_(heads.bias)
    expected = torch.stack([x[i] @ heads.weight[g[i]] + heads.bias[g[i]] for i in range(len(g))])
    torch.testing.assert_close(heads(x, g), expected)


def test_mlp_heads_match_per_group_mlps(batch):
    x, g = batch
    heads = MLPHeads(3, 6, hidden=4)
    expected = torch.stack(
        [(torch.relu(x[i] @ heads.w1[g[i]] + heads.b1[g[i]]) * heads.w2[g[i]]).sum() + heads.b2[g[i]] for i in range(len(g))]
    )
    torch.testing.assert_close(heads(x, g), expected)


@pytest.mark.parametrize("make", [lambda: LinearHeads(3, 6), lambda: MLPHeads(3, 6, hidden=4)])
def test_a_group_only_gets_gradients_from_its_rows(batch, make):
    x, g = batch
    heads = make()
    torch.nn.init.normal_(next(heads.parameters()))
    heads(x, g)[g == 1].sum().backward()
    for p in heads.parameters():
        assert p.grad[1].abs().sum() > 0
        assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0


def test_mlp_works_on_a_batch_missing_some_groups(batch):
    x, g = batch
    heads = MLPHeads(5, 6, hidden=4)
    keep = g != 1
    torch.testing.assert_close(heads(x[keep], g[keep]), heads(x, g)[keep])
