"""streamml.offline.slates: padding round-trips and keeps gradients."""

import torch

from streamml.offline.slates import pad


def test_pad_round_trips_and_orders_groups():
    values = torch.arange(12.0).reshape(6, 2)
    groups = torch.tensor([5, 2, 5, 5, 9, 2])
    s = pad(values, groups)
    assert s.padded.shape == (3, 3, 2) and s.group_ids.tolist() == [2, 5, 9]
    assert torch.equal(s.padded[s.row, s.col], values)
    assert s.mask.sum(1).tolist() == [2, 3, 1]
    assert s.col.tolist() == [0, 0, 1, 2, 0, 1]  # input order kept within a group
    assert (s.padded[~s.mask] == 0).all()


def test_pad_passes_gradients_back():
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    s = pad(values, torch.tensor([0, 1, 0]))
    (s.padded * torch.tensor([[1.0, 10.0], [100.0, 0.0]])).sum().backward()
    assert values.grad.tolist() == [1.0, 100.0, 10.0]
