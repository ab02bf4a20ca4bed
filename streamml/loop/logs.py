"""Reading an exported event log back: its slates, its labelled rewards, a held-out slice, a fingerprint.

Every later step of the loop (off-policy evaluation, retraining, residual migration, the
replay of what the service logged) starts from the Parquet dataset that
``python -m streamml.loop export`` writes (:mod:`streamml.loop.export`, schema there). They
read it through these functions so that they agree on what a slate, a reward and "the
held-out slice" are.

- :func:`read_slates`: one row per served slate (the export's rows), in ``(created, event_id)`` order.
- :func:`reward_rows`: one row per answered shown item, with its position, its logged
  propensity and its label: the event stream ``user, query, item, label, time`` of
  :func:`streamml.online.replay.check_log` plus ``position, propensity, event_id, head``.
- :func:`split_by_time`: the latest ``holdout`` fraction of slates is held out (evaluation),
  the rest is for training; by time, because a challenger is judged on traffic after the
  data it learned from, as it would be once promoted.
- :func:`fingerprint`: a digest of the dataset's files, the data tag of runs trained or
  evaluated on it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["partition_files", "read_slates", "reward_rows", "check_catalog", "split_by_time", "fingerprint"]


def partition_files(folder: str | Path) -> list[str]:
    """The export's Parquet files in a fixed order (date partition, then chunk); an error names a
    folder that is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no exported event log at {folder}: run `python -m streamml.loop export out={folder}` first")
    parts = sorted(str(p) for p in folder.glob("date=*/part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no date=*/part-*.parquet files: is it an export folder?")
    return parts


def read_slates(folder: str | Path) -> pd.DataFrame:
    """The export's rows (one per slate), sorted by ``(created, event_id)``; ``date`` is a column."""
    import pyarrow.dataset as ds

    partition_files(folder)
    table = ds.dataset(str(folder), format="parquet", partitioning="hive").to_table()
    return table.to_pandas().sort_values(["created", "event_id"], kind="stable").reset_index(drop=True)


def reward_rows(slates: pd.DataFrame, source: str = "the export", unlabelled: str = "error") -> pd.DataFrame:
    """One row per labelled reward of ``slates`` (shown catalog items only), in time order.

    Columns: ``user, query, item, label, time, position, propensity, event_id, head``. A
    reward's ``time`` is when it came (the slate's ``created`` when the log did not keep it).
    A reward without a label (a log written before claims kept it) is an error naming its event
    (``unlabelled="error"``: it cannot be counted either way) or left out (``"skip"``: the replay).
    Slates over raw candidate vectors are left out (their items are not catalog ids).
    """
    if unlabelled not in ("error", "skip"):
        raise ValueError(f"unlabelled must be 'error' or 'skip', got {unlabelled!r}")
    columns = ["user", "query", "item", "label", "time", "position", "propensity", "event_id", "head"]
    if not len(slates):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    slates = slates[~slates["raw_candidates"].astype(bool)]
    ex = slates[["event_id", "user", "query", "created", "head", "propensities", "rewards"]].explode("rewards")
    ex = ex[ex["rewards"].notna()]
    if not len(ex):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    r = pd.DataFrame(ex["rewards"].tolist(), index=ex.index)
    missing = r["label"].isna().to_numpy()
    if missing.any() and unlabelled == "error":
        k = int(np.flatnonzero(missing)[0])
        raise ValueError(f"{source}, event {ex['event_id'].iloc[k]!r}: the reward of item {r['item'].iloc[k]} has no label "
                         "(the event log did not keep it, see streamml.loop.export)")
    keep = ~missing
    ex, r = ex[keep], r[keep]
    position = r["position"].to_numpy(np.int64)
    out = pd.DataFrame({
        "user": ex["user"].astype(str).to_numpy(), "query": ex["query"].astype(str).to_numpy(),
        "item": r["item"].to_numpy(np.int64), "label": r["label"].to_numpy(np.int64),
        "time": r["time"].astype(float).fillna(ex["created"].astype(float)).to_numpy(),
        "position": position,
        "propensity": np.array([p[j] for p, j in zip(ex["propensities"], position)], np.float64),
        "event_id": ex["event_id"].to_numpy(), "head": ex["head"].to_numpy()})
    return out.sort_values(["time", "event_id", "position"], kind="stable").reset_index(drop=True)


def check_catalog(rewards: pd.DataFrame, queries, source: str = "the export") -> None:
    """Every reward's item is a catalog row of its own query (``queries[i]``: item ``i``'s query);
    otherwise an error naming the event: a catalog changed since the log was written gives its ids
    to other items."""
    queries = np.asarray(queries, dtype=object)
    items = rewards["item"].to_numpy(np.int64)
    ok = (items >= 0) & (items < len(queries))
    ok[ok] = queries[items[ok]] == rewards["query"].to_numpy(object)[ok]
    if not ok.all():
        bad = rewards[~ok].iloc[0]
        raise ValueError(f"{source}, event {bad['event_id']!r}: item {bad['item']} of query {bad['query']!r} is not that "
                         f"query's item in the catalog ({len(queries)} items): is it the catalog the service served?")


def split_by_time(slates: pd.DataFrame, holdout: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, held_out)``: the latest ``holdout`` fraction of slates by ``(created, event_id)`` is held out."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    order = slates.sort_values(["created", "event_id"], kind="stable")
    cut = len(order) - int(round(holdout * len(order)))
    return order.iloc[:cut].reset_index(drop=True), order.iloc[cut:].reset_index(drop=True)


def fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex) of the export's part files, names and bytes: the same files, the same tag."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in map(Path, partition_files(folder)):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
