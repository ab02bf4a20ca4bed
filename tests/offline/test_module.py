"""streamml.offline.module: HeadLearner honours the learner contract and trains deterministically;
EpochProgress shows one labelled bar over epochs."""

import pickle
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from streamml.offline.heads import LinearHeads, MLPHeads, MultiTaskHeads
from streamml.offline.losses import get_loss
from streamml.offline.module import EpochProgress, HeadLearner, RankingDataModule

D = 16
TRAINER = partial(L.Trainer, max_epochs=40, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, deterministic=True)


def make(head="linear", loss="ranknet", **kw):
    heads = {"linear": partial(LinearHeads, dim=D), "mlp": partial(MLPHeads, dim=D, hidden=8),
             "multitask": partial(MultiTaskHeads, dim=D, rank=4)}[head]
    return HeadLearner(heads, get_loss(loss), partial(torch.optim.AdamW, lr=0.05), TRAINER, **kw)


def two_groups(seed, n=40):
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(n) % 2, 2)
    groups = np.repeat([3, 8], n)
    direction = np.where(groups[:, None] == 3, np.eye(D)[0], np.eye(D)[1])
    X = rng.normal(size=(2 * n, D)) + 2.5 * (2 * y - 1)[:, None] * direction
    return X.astype(np.float32), y, groups


@pytest.mark.parametrize("head", ["linear", "mlp", "multitask"])
@pytest.mark.parametrize("loss", ["ranknet", "margin", "bce"])
def test_ranks_held_out_items(head, loss):
    learner = make(head, loss).fit(*two_groups(0))
    X, y, g = two_groups(1)
    s = learner.score_rows(X, g)
    for group in (3, 8):
        assert roc_auc_score(y[g == group], s[g == group]) > 0.9


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_seeded_fits_repeat_exactly_and_seeds_matter(head):
    X, y, g = two_groups(0)
    a = make(head).fit(X, y, g).score_rows(X, g)
    np.testing.assert_array_equal(a, make(head).fit(X, y, g).score_rows(X, g))
    if head == "mlp":  # linear heads start at zero, so only the MLP's init depends on the seed
        assert not np.array_equal(a, make(head, seed=1).fit(X, y, g).score_rows(X, g))


def test_pickle_round_trip_and_unseen_group():
    X, y, g = two_groups(0)
    learner = make().fit(X, y, g)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(learner)).score_rows(X, g), learner.score_rows(X, g))
    with pytest.raises(ValueError, match="group 5 was not seen in fit"):
        learner.score_rows(X[:2], np.array([3, 5]))


def test_minibatches_cover_the_data_once_per_epoch():
    X, y, g = two_groups(0, n=10)
    loader = RankingDataModule(X, y, g, batch_size=7, seed=0).train_dataloader()
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [7, 7, 6]
    seen = torch.cat([b[0] for b in batches])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, torch.tensor(X).tolist()))
    full = list(RankingDataModule(X, y, g).train_dataloader())
    assert len(full) == 1 and torch.equal(full[0][0], torch.tensor(X))


def test_callbacks_see_every_epoch():
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append(float(trainer.callback_metrics["train_loss"]))

    make().fit(*two_groups(0), callbacks=[Spy()])
    assert len(seen) == 40 and seen[-1] < seen[0]


def test_epoch_bar_counts_epochs_under_its_label(capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4)).astype("float32")
    trainer = partial(L.Trainer, max_epochs=3, logger=False, enable_checkpointing=False, enable_model_summary=False)
    learner = HeadLearner(partial(LinearHeads, dim=4), get_loss("ranknet"), partial(torch.optim.Adam, lr=0.1), trainer)
    learner.fit(X, np.tile([0, 1], 10), np.zeros(20, dtype=int), callbacks=[EpochProgress("final fit")])
    err = capsys.readouterr().err
    assert "final fit: 100%" in err and "3/3" in err and "train_loss=" in err


def test_a_fit_without_an_epoch_bar_prints_no_lightning_bar(capfd):
    """The online scenarios fit a head with the default trainer (bars on) and no callbacks:
    Lightning's batch bar ("Epoch 299/299 ... 1/1") must not appear."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4)).astype("float32")
    trainer = partial(L.Trainer, max_epochs=3, logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=True, accelerator="cpu")
    learner = HeadLearner(partial(LinearHeads, dim=4), get_loss("ranknet"), partial(torch.optim.Adam, lr=0.1), trainer)
    learner.fit(X, np.tile([0, 1], 10), np.zeros(20, dtype=int))
    out, err = capfd.readouterr()
    assert "Epoch" not in out + err and "it/s" not in out + err


def test_multitask_shares_within_a_block_and_learns_nothing_from_another_block():
    X, y, g = two_groups(0)
    X2, y2, g2 = two_groups(1)
    X, y, g = np.concatenate([X, X2]), np.concatenate([y, y2]), np.concatenate([g, g2 + 10])
    blocks = (g >= 10).astype(int)  # two CV splits: groups 3, 8 and groups 13, 18
    learner = make("multitask").fit(X, y, g, blocks=blocks)
    assert learner.heads_.blocks.tolist() == [0, 0, 1, 1]
    # Shuffling labels inside block 1's groups (same pair count, so the same loss scale) leaves block 0 as it was.
    rng, scrambled = np.random.default_rng(0), y.copy()
    for group in (13, 18):
        scrambled[g == group] = rng.permutation(y[g == group])
    other = make("multitask").fit(X, scrambled, g, blocks=blocks)
    np.testing.assert_allclose(other.score_rows(X, g)[blocks == 0], learner.score_rows(X, g)[blocks == 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(other.score_rows(X, g)[blocks == 1], learner.score_rows(X, g)[blocks == 1])


def test_a_group_spanning_two_blocks_is_an_error():
    X, y, g = two_groups(0)
    with pytest.raises(ValueError, match=r"group 3 spans more than one block \(\[0, 1\]\)"):
        make("multitask").fit(X, y, g, blocks=np.arange(len(g)) % 2)


def test_under_ddp_each_process_trains_whole_groups():
    X, y, g = two_groups(0, n=10)  # groups 3 and 8
    groups = np.searchsorted([3, 8], g)
    seen = []
    for rank in (0, 1):
        data = RankingDataModule(X, y, groups)
        data.trainer = type("FakeTrainer", (), {"world_size": 2, "global_rank": rank})()
        (batch,) = list(data.train_dataloader())
        seen.append(batch[2])
    assert set(seen[0].tolist()) == {0} and set(seen[1].tolist()) == {1}
    assert len(seen[0]) + len(seen[1]) == len(X)
