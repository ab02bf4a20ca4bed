import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from streamml.offline.losses import LOSSES, bce, get_loss, margin, ranknet


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


ONE_GROUP = t(0, 0, dtype=torch.long)


# ranknet: hand-computed slates


def test_ranknet_two_items():
    assert ranknet(t(2.0, 0.0), t(1, 0), ONE_GROUP).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_ranknet_wrong_order_costs_more():
    assert ranknet(t(0.0, 2.0), t(1, 0), ONE_GROUP).item() == pytest.approx(math.log(1 + math.exp(2)))


def test_ranknet_three_items_averages_over_pairs():
    # Pairs (0, 1) and (0, 2): differences 1 and -1; items 1 and 2 share a label and form no pair.
    loss = ranknet(t(1.0, 0.0, 2.0), t(1, 0, 0), t(0, 0, 0, dtype=torch.long))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert loss.item() == pytest.approx(expected)


def test_ranknet_accepts_float_labels():
    assert ranknet(t(2.0, 0.0), t(1.0, 0.0), ONE_GROUP).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_ranknet_equals_bce_on_pair_differences():
    torch.manual_seed(0)
    scores = torch.randn(12)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    diffs = torch.stack(
        [
            scores[i] - scores[j]
            for i in range(12)
            for j in range(12)
            if groups[i] == groups[j] and labels[i] == 1 and labels[j] == 0
        ]
    )
    assert len(diffs) == 2 * 2 + 2 * 3 + 1 * 2
    expected = F.binary_cross_entropy_with_logits(diffs, torch.ones_like(diffs))
    torch.testing.assert_close(ranknet(scores, labels, groups), expected)


@pytest.mark.parametrize("loss", [ranknet, margin])
def test_pairs_never_cross_groups(loss):
    # Within each group the accepted item leads by 3; across groups, accepted item 0 (score 0)
    # against rejected item 3 (score 10) would be a badly ordered pair.
    scores, labels = t(0.0, -3.0, 13.0, 10.0), t(1, 0, 1, 0)
    split = loss(scores, labels, t(0, 0, 1, 1, dtype=torch.long))
    merged = loss(scores, labels, t(0, 0, 0, 0, dtype=torch.long))
    assert split.item() == pytest.approx(loss(t(0.0, -3.0), t(1, 0), ONE_GROUP).item())
    assert merged.item() > split.item()


def test_group_ids_need_not_be_contiguous_or_sorted():
    scores, labels = t(2.0, 5.0, 0.0, 5.0), t(1, 1, 0, 1)
    # Only item 0 (group 42) and item 2 (group 42) form a pair.
    loss = ranknet(scores, labels, t(42, 7, 42, -1, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)))


# margin: hand-computed slates


@pytest.mark.parametrize(
    ("scores", "m", "expected"),
    [
        ((0.25, 0.0), 1.0, 0.75),  # inside the margin
        ((0.0, 1.0), 1.0, 2.0),  # wrong order
        ((1.0, 0.0), 1.0, 0.0),  # exactly at the margin: zero region starts
        ((3.0, 0.0), 1.0, 0.0),  # well past the margin
        ((3.0, 0.0), 5.0, 2.0),  # a wider margin penalises the same lead
    ],
)
def test_margin_hand_cases(scores, m, expected):
    assert margin(t(*scores), t(1, 0), ONE_GROUP, margin=m).item() == pytest.approx(expected)


def test_margin_three_items():
    # Pairs (0, 1): lead 0.5 -> 0.5; (0, 2): lead 2 -> 0.
    assert margin(t(2.0, 1.5, 0.0), t(1, 0, 0), t(0, 0, 0, dtype=torch.long)).item() == pytest.approx(0.25)


def test_margin_zero_region_has_zero_gradient():
    scores = t(3.0, 0.0).requires_grad_()
    margin(scores, t(1, 0), ONE_GROUP).backward()
    assert torch.equal(scores.grad, t(0.0, 0.0))


# bce


def test_bce_hand_case_and_ignores_groups():
    scores, labels = t(2.0, -1.0), t(1, 0)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert bce(scores, labels, ONE_GROUP).item() == pytest.approx(expected)
    assert bce(scores, labels, t(0, 1, dtype=torch.long)).item() == pytest.approx(expected)


# no valid pairs


@pytest.mark.parametrize("loss", [ranknet, margin])
@pytest.mark.parametrize(
    ("labels", "groups"),
    [
        ((1, 1, 1), (0, 0, 0)),  # one class only
        ((0, 0, 0), (0, 0, 0)),
        ((1, 0, 1), (0, 1, 2)),  # both classes, but never in the same group
    ],
)
def test_no_pairs_gives_zero_with_working_backward(loss, labels, groups):
    scores = t(0.3, -1.0, 2.0).requires_grad_()
    value = loss(scores, t(*labels), t(*groups, dtype=torch.long))
    assert value.item() == 0.0
    assert value.grad_fn is not None
    value.backward()
    assert torch.equal(scores.grad, torch.zeros(3))


# gradients


def test_ranknet_gradient_matches_hand_formula():
    # d/ds_i mean_p softplus(-(s_i - s_j)) = -sigmoid(-(s_i - s_j)) / P for the accepted item i,
    # and +sigmoid(-(s_i - s_j)) / P for the rejected item j.
    torch.manual_seed(1)
    scores = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1, 0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    pairs = [(0, 1), (0, 2), (3, 4)]
    expected = torch.zeros(5, dtype=torch.float64)
    for i, j in pairs:
        weight = torch.sigmoid(-(scores[i] - scores[j])).item() / len(pairs)
        expected[i] -= weight
        expected[j] += weight
    ranknet(scores, labels, groups).backward()
    torch.testing.assert_close(scores.grad, expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(name):
    torch.manual_seed(2)
    scores = torch.randn(8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # Random scores keep the hinge away from its kink, where finite differences are not defined.
    assert torch.autograd.gradcheck(lambda s: LOSSES[name](s, labels, groups), (scores,))


# registry


def test_registry_is_explicit():
    assert LOSSES == {"ranknet": ranknet, "margin": margin, "bce": bce}


def test_get_loss_binds_keywords():
    loss = get_loss("margin", margin=0.5)
    assert loss(t(0.25, 0.0), t(1, 0), ONE_GROUP).item() == pytest.approx(0.25)
    assert get_loss("ranknet")(t(2.0, 0.0), t(1, 0), ONE_GROUP).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_get_loss_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"'lambdarank'.*bce, margin, ranknet"):
        get_loss("lambdarank")


def test_importing_losses_and_metrics_pulls_in_no_sklearn_or_data_layer():
    code = (
        "import sys, streamml.offline.losses, streamml.offline.metrics\n"
        "heavy = {'sklearn', 'pandas', 'streamml.data'}\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
