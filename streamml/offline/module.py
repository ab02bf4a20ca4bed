"""Lightning wiring for the per-query heads, behind the same fit/score_rows contract as the baselines.

``HeadLearner.fit(X, y, groups)`` trains one head per group in a single Lightning fit,
so the cross-validation harness can pack every (fold, query) pair into one run and
compare heads with sklearn and river learners on identical folds. ``EpochProgress``
replaces Lightning's per-batch bar (with full batches, one step per epoch) by one bar
over epochs, named for what the fit is for ("cv", "final fit").
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SubsetRandomSampler, TensorDataset
from tqdm.auto import tqdm

# Lightning's own pytree helper builds torch's deprecated LeafSpec on every fit (Lightning
# <= 2.6 with torch >= 2.10); only that message, from only that module, is hidden.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class RankingModule(L.LightningModule):
    """Trains stacked heads with a pairwise (or pointwise) loss; pairs never cross groups."""

    def __init__(self, heads: nn.Module, loss: Callable, optimizer: Callable):
        super().__init__()
        self.heads, self.loss, self.optimizer = heads, loss, optimizer

    def forward(self, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return self.heads(x, group)

    def training_step(self, batch, batch_idx):
        x, y, group = batch
        loss = self.loss(self(x, group), y, group)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters())


class RankingDataModule(L.LightningDataModule):
    """Serves (x, label, group) rows; the default batch is the whole training set.

    The data is small (hundreds of rows per query), so full batches give every pair of
    a query to each step; a smaller ``batch_size`` forms pairs inside each batch only.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, batch_size: int | None = None, seed: int = 0):
        super().__init__()
        self.dataset = TensorDataset(
            torch.tensor(X, dtype=torch.float32),
            torch.tensor(y, dtype=torch.float32),
            torch.tensor(groups, dtype=torch.long),
        )
        self.batch_size = batch_size  # None: the whole (shard of the) training set
        self.seed = seed

    def train_dataloader(self):
        # Batches are fetched by one fancy index rather than row by row and collated:
        # per-row fetching cost more than the training step itself.
        rows = self._shard()
        generator = torch.Generator().manual_seed(self.seed)
        batch_size = self.batch_size or len(rows)
        order = SubsetRandomSampler(rows, generator=generator) if batch_size < len(rows) else rows.tolist()
        return DataLoader(self.dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)

    def _shard(self) -> np.ndarray:
        """Rows this process trains on: all of them, or under DDP the groups ``g % world_size == rank``.

        Sharding by group keeps every pair of a group on one process, so each head's
        gradient is what one process would compute, only rescaled by the all-reduce (which
        Adam's per-parameter normalisation cancels): 2 processes train the same heads as 1.
        Run DDP with ``use_distributed_sampler: false`` (configs/trainer/ddp.yaml).
        """
        groups = self.dataset.tensors[2].numpy()
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size == 1:
            return np.arange(len(groups))
        return np.flatnonzero(groups % trainer.world_size == trainer.global_rank)


class HeadLearner:
    """Per-group neural heads trained with Lightning, with the ``fit``/``score_rows`` contract.

    Parameters
    ----------
    head : callable
        ``head(n_groups=G) -> nn.Module`` (a Hydra partial of a class in ``heads``, with
        ``dim`` bound).
    loss : callable
        ``loss(scores, labels, groups) -> scalar`` from ``losses``.
    optimizer : callable
        ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra partial).
    trainer : callable
        ``trainer(**kwargs) -> lightning.Trainer`` (a Hydra partial).
    batch_size : int, optional
        Rows per step; ``None`` means full batch.
    seed : int
        Seeds weight init and batch order, so runs repeat exactly on CPU.

    Examples
    --------
    >>> from functools import partial
    >>> from streamml.offline.heads import LinearHeads
    >>> from streamml.offline.losses import ranknet
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)).astype("float32"); y = (X[:, 0] > 0).astype(int)
    >>> groups = np.repeat([0, 1], 20)
    >>> learner = HeadLearner(partial(LinearHeads, dim=8), ranknet, partial(torch.optim.Adam, lr=0.1),
    ...     partial(L.Trainer, max_epochs=30, logger=False, enable_progress_bar=False,
    ...             enable_model_summary=False, enable_checkpointing=False))
    >>> scores = learner.fit(X, y, groups).score_rows(X, groups)
    >>> bool(scores[y == 1].mean() > scores[y == 0].mean())
    True
    """

    def __init__(self, head: Callable, loss: Callable, optimizer: Callable, trainer: Callable,
                 batch_size: int | None = None, seed: int = 0):
        self.head, self.loss, self.optimizer, self.trainer = head, loss, optimizer, trainer
        self.batch_size, self.seed = batch_size, seed

    @classmethod
    def from_linear_weights(cls, weight: np.ndarray) -> HeadLearner:
        """A learner as ``fit`` leaves it, with the given per-group linear weights ``(G, D)``: heads
        whose scores are known, for tests and benchmarks of what consumes a trained head.

        >>> HeadLearner.from_linear_weights(np.eye(2)).score_rows(np.eye(2, dtype="float32"), np.array([0, 1]))
        array([1., 1.], dtype=float32)
        """
        from functools import partial

        from streamml.offline.heads import LinearHeads
        from streamml.offline.losses import ranknet

        learner = cls(partial(LinearHeads, dim=weight.shape[1]), ranknet, partial(torch.optim.Adam), None)
        learner.groups_ = np.arange(len(weight))
        heads = LinearHeads(*weight.shape)
        with torch.no_grad():
            heads.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        learner.heads_ = heads.eval()
        return learner

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray, blocks: np.ndarray | None = None,
            callbacks: list | None = None) -> "HeadLearner":
        """Train one head per group; ``blocks`` (N,) says which groups a head may share parameters with."""
        L.seed_everything(self.seed, workers=True, verbose=False)
        self.groups_, first = np.unique(groups, return_index=True)
        head_kwargs = {"n_groups": len(self.groups_)}
        if "blocks" in inspect.signature(self.head).parameters:
            head_kwargs["blocks"] = torch.as_tensor(_block_of_group(groups, blocks, self.groups_, first))
        module = RankingModule(self.head(**head_kwargs), self.loss, self.optimizer)
        data = RankingDataModule(X, y, np.searchsorted(self.groups_, groups), self.batch_size, self.seed)
        callbacks = list(callbacks or [])
        # Lightning's own bar counts batches: a full-batch fit shows "1/1" for each of its epochs,
        # which says nothing. A caller that wants a bar passes one over the epochs (EpochProgress).
        quiet = {} if any(isinstance(c, ProgressBar) for c in callbacks) else {"enable_progress_bar": False}
        self.trainer(callbacks=callbacks, **quiet).fit(module, datamodule=data)
        self.heads_ = module.heads.cpu().eval()
        return self

    @torch.no_grad()
    def score_rows(self, X: np.ndarray, groups: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.groups_, groups)
        unseen = (idx >= len(self.groups_)) | (self.groups_[np.minimum(idx, len(self.groups_) - 1)] != groups)
        if unseen.any():
            raise ValueError(f"group {groups[unseen][0].item()!r} was not seen in fit; known groups: {self.groups_.tolist()}")
        x = torch.as_tensor(X, dtype=torch.float32)
        return self.heads_(x, torch.as_tensor(idx, dtype=torch.long)).numpy()


class EpochProgress(ProgressBar):
    """A tqdm bar over the epochs of one fit, labelled, with the last ``train_loss``."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar, self._enabled = label, None, True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self.bar = tqdm(total=total, desc=self.label, unit="epoch", dynamic_ncols=True,
                        disable=not (self._enabled and trainer.is_global_zero))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.bar.set_postfix(train_loss=f"{float(loss):.4f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.bar.close()
def _block_of_group(groups: np.ndarray, blocks: np.ndarray | None, group_ids: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(G,) block index 0..K-1 of each group in ``group_ids``; every group must lie in one block."""
    if blocks is None:
        return np.zeros(len(group_ids), dtype=np.int64)
    blocks = np.asarray(blocks)
    if blocks.shape != np.shape(groups):
        raise ValueError(f"blocks must have shape {np.shape(groups)}, like groups; got {blocks.shape}")
    of_group = blocks[first]
    mixed = of_group[np.searchsorted(group_ids, groups)] != blocks
    if mixed.any():
        g = groups[mixed][0].item()
        raise ValueError(f"group {g!r} spans more than one block ({sorted(set(blocks[groups == g].tolist()))})")
    return np.unique(of_group, return_inverse=True)[1].astype(np.int64)
