"""streamml.offline.heads: vectorised heads equal a loop over per-group models."""

import pytest
import torch

from streamml.offline.heads import LinearHeads, MLPHeads, MultiTaskHeads


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


BLOCKS = torch.tensor([0, 0, 1])  # groups 0 and 1 share a projection; group 2 has its own


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("own", [True, False])
def test_multitask_heads_match_a_loop_over_groups(batch, activation, own):
    x, g = batch
    heads = MultiTaskHeads(3, 6, rank=4, blocks=BLOCKS, own=own, activation=activation)
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    act = torch.relu if activation == "relu" else (lambda h: h)
    expected = []
    for i in range(len(g)):
        b = BLOCKS[g[i]]
        s = act(x[i] @ heads.projection[b] + heads.bias[b]) @ heads.weight[g[i]] + heads.offset[g[i]]
        expected.append(s + (x[i] @ heads.own[g[i]] if own else 0))
    torch.testing.assert_close(heads(x, g), torch.stack(expected))
    assert heads(x, g).shape == (len(g),)


def test_multitask_shares_the_projection_within_a_block_only(batch):
    x, g = batch
    heads = MultiTaskHeads(3, 6, rank=4, blocks=BLOCKS)
    heads(x, g)[g == 1].sum().backward()
    assert heads.projection.grad[0].abs().sum() > 0  # group 1's rows train its block's projection ...
    assert heads.projection.grad[1].abs().sum() == 0  # ... and never the projection of another block
    for name in ("weight", "own", "offset"):  # per-group parameters stay per group
        grad = getattr(heads, name).grad
        assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_multitask_gradients_match_finite_differences(batch):
    x, g = batch
    heads = MultiTaskHeads(3, 6, rank=2, blocks=BLOCKS, activation="relu").double()
    torch.autograd.gradcheck(lambda p: torch.func.functional_call(heads, {"projection": p}, (x.double(), g)),
                             (heads.projection.detach().clone().requires_grad_(),))


def test_multitask_blocks_default_to_one_block_and_are_checked():
    assert MultiTaskHeads(4, 6).blocks.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"blocks must have shape \(4,\), got \(3,\)"):
        MultiTaskHeads(4, 6, blocks=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="activation must be 'identity' or 'relu', got 'tanh'"):
        MultiTaskHeads(4, 6, activation="tanh")
