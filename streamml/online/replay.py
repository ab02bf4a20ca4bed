"""Replay of real logged feedback: the judge of online learning.

A simulator shows what a learner does for the users we imagine; a replay shows what it does
for people. Logged events (user, query, item, label, time) are read from one of two
sources, all into the same :data:`LOG_COLUMNS` frame:

* :func:`read_movielens`: MovieLens 100k (GroupLens; research use only, never committed). A
  query is one of the largest genres, an item's text is the movie title, and a rating of
  ``accept_at`` or more is an accept. A movie of several genres is one item per genre.
* :func:`read_log`: a CSV or Parquet file with the columns ``user, query, item, label, time``
  and, where the texts must be embedded, ``text`` (the documented format; ``label`` is 1/0
  or ``accepted``/``rejected``; ``time`` is a number or an ISO timestamp).

* :func:`read_export`: the service's own event log (SQLite, Redis or a Redis Cluster), as
  ``python -m streamml.loop export`` writes it (:mod:`streamml.loop.export`): one event per
  labelled reward, the item a catalog id, its text from the catalog folder the service served.

**The protocol** (:func:`replay`). Users are split at random into population, tuning and
test users, all disjoint (:func:`split_users`). The head and whatever a learner fits from a
population (:meth:`fit_population`) see only the population's events. Each tuning or test
user's events of one query form a *key*; they are put in time order, ties broken by the
item's id (MovieLens users rate in bursts that share a timestamp), then the last
``probe_fraction`` of them is the probe set and the rest the stream. A learner learns the
stream one event at a time; after 5, 10, 20 and 40 events its scores of the probe items are
compared with the probe labels (probe AUC). A checkpoint counts the keys whose stream
reaches it, and every learner is measured on the same keys.

:func:`summarize` gives per learner and checkpoint the mean probe AUC with its standard
error clustered by user (a user has one key per query), the paired difference to the head,
and both for the users the head serves well and badly: split at the median of the head's
AUC on the key's *stream* events, so that the grouping does not share the probe's noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

__all__ = ["LOG_COLUMNS", "CHECKPOINTS", "Catalog", "Key", "read_movielens", "read_log", "read_export", "split_users",
           "build_catalog", "head_labels", "median_labels", "make_keys", "replay", "summarize", "clustered_se", "shuffle_labels"]

LOG_COLUMNS = ("user", "query", "item", "label", "time")
CHECKPOINTS = (5, 10, 20, 40)


class LogError(ValueError):
    """A logged-events file or frame is malformed: the message names the file, row and problem."""


# --------------------------------------------------------------------------- readers
def read_movielens(directory: str | Path, n_genres: int = 8, accept_at: int = 4) -> pd.DataFrame:
    """MovieLens 100k as logged events: one row per (rating, genre of the movie) of the
    ``n_genres`` genres with the most ratings; ``label`` is ``rating >= accept_at``; ``item`` is
    ``"<genre>/<movie id>"`` and ``text`` the title. Also keeps ``rating`` and ``movie``."""
    directory = Path(directory)
    for name in ("u.data", "u.item", "u.genre"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: MovieLens 100k (GroupLens) is not shipped; "
                                    "point at the folder that holds u.data, u.item and u.genre")
    genres = pd.read_csv(directory / "u.genre", sep="|", names=["name", "id"]).dropna().name.tolist()
    items = pd.read_csv(directory / "u.item", sep="|", encoding="latin-1",
                        names=["movie", "title", "release", "video", "url", *genres])
    ratings = pd.read_csv(directory / "u.data", sep="\t", names=["user", "movie", "rating", "time"])
    merged = ratings.merge(items[["movie", "title", *genres]], on="movie", validate="many_to_one")
    sizes = merged[genres].sum().sort_values(ascending=False, kind="stable")
    rows = []
    for genre in sizes.index[:n_genres]:
        part = merged[merged[genre] == 1]
        rows.append(pd.DataFrame({
            "user": part.user.astype(str).to_numpy(), "query": genre,
            "item": genre + "/" + part.movie.astype(str), "label": (part.rating >= accept_at).astype(np.int8).to_numpy(),
            "time": part.time.astype(np.int64).to_numpy(), "text": part.title.to_numpy(),
            "rating": part.rating.to_numpy(), "movie": part.movie.to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def _labels(values: pd.Series, where: str) -> np.ndarray:
    names = {"accepted": 1, "rejected": 0, 1: 1, 0: 0, "1": 1, "0": 0}  # True and False hash as 1 and 0
    mapped = values.map(lambda v: names.get(v))
    bad = mapped.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise LogError(f"{where}, row {row}: label must be 1/0 or accepted/rejected, got {values.iloc[row]!r}")
    return mapped.astype(np.int8).to_numpy()


def check_log(frame: pd.DataFrame, where: str = "events") -> pd.DataFrame:
    """The frame with the :data:`LOG_COLUMNS` checked and typed; a :class:`LogError` naming the
    first bad row otherwise (rows counted from 0, after the header)."""
    missing = [c for c in LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise LogError(f"{where}: missing column(s) {missing}; a log has columns {list(LOG_COLUMNS)} (and text)")
    out = frame.reset_index(drop=True).copy()
    for column in ("user", "query", "item"):
        empty = out[column].isna() | (out[column].astype(str).str.len() == 0)
        if empty.any():
            raise LogError(f"{where}, row {int(np.flatnonzero(empty.to_numpy())[0])}: {column} is empty")
    out["label"] = _labels(out["label"], where)
    time = pd.to_numeric(out["time"], errors="coerce")
    if time.isna().any():
        parsed = pd.to_datetime(out["time"], errors="coerce", utc=True, format="ISO8601")
        bad = parsed.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise LogError(f"{where}, row {row}: time must be a number or an ISO timestamp, got {out['time'].iloc[row]!r}")
        time = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    out["time"] = time.astype(np.float64)
    return out


def read_log(path: str | Path) -> pd.DataFrame:
    """Logged events from a ``.csv`` or ``.parquet`` file (or a folder of Parquet partitions)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such log file")
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
    elif path.suffix == ".parquet" or path.is_dir():
        frame = pd.read_parquet(path)
    else:
        raise LogError(f"{path}: a log is a .csv or .parquet file (or a folder of Parquet partitions)")
    return check_log(frame, str(path))


def read_export(folder: str | Path, catalog: str | Path | None = None, embedding_dim: int = 384) -> pd.DataFrame:
    """The service's logged rewards from an export folder (``date=*/part-*.parquet``): one row per
    reward with a label, ``item`` the catalog item id and ``time`` the reward's (its event's
    ``created`` if the log kept none), plus ``event_id`` and ``position``.

    ``catalog`` is the folder of query files the service served (its ``items_dir``): each item's
    ``text`` is read from it, and an item whose query there is not the logged one is an error
    naming the event (a catalog changed since, whose ids mean other items). Skipped, because
    there is nothing to replay: events of raw candidates (their items index the request, not the
    catalog) and rewards without a label (a log written before claims kept it)."""
    from streamml.loop.logs import check_catalog, read_slates, reward_rows

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no export folder (python -m streamml.loop export out={folder})")
    frame = reward_rows(read_slates(folder), str(folder), unlabelled="skip").drop(columns=["propensity", "head"])
    frame = frame.astype({"item": np.int64, "position": np.int64, "label": np.int8})
    if catalog is not None:
        from streamml.stores.events import read_catalog

        rows = read_catalog(catalog, embedding_dim)
        try:
            check_catalog(frame, rows.queries, str(folder))
        except ValueError as err:
            raise LogError(f"{err} (catalog {catalog})") from None
        frame["text"] = np.asarray(rows.texts, dtype=object)[frame.item.to_numpy()]
    return check_log(frame, str(folder))


# --------------------------------------------------------------------------- splits and catalog
def split_users(users, seed: int = 0, population: float = 0.4, tuning: float = 0.1) -> dict[str, set]:
    """Disjoint ``population``, ``tuning`` and ``test`` users (the rest), by a seeded shuffle of
    the sorted distinct ids."""
    if not (0 < population and 0 <= tuning and population + tuning < 1):
        raise ValueError(f"population ({population}) and tuning ({tuning}) fractions must leave test users")
    ids = np.array(sorted(set(map(str, users))))
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    n_pop, n_tune = int(round(population * len(ids))), int(round(tuning * len(ids)))
    return {"population": set(ids[:n_pop]), "tuning": set(ids[n_pop:n_pop + n_tune]), "test": set(ids[n_pop + n_tune:])}


@dataclass
class Catalog:
    """The replay's items: one row per (query, item), with its embedding and its head score."""

    items: pd.DataFrame  # query, item, text; row i is catalog id i
    X: np.ndarray  # (n, D) embeddings
    index: dict  # (query, item) -> catalog id
    fingerprint: str

    @property
    def item_query(self) -> np.ndarray:
        return self.items["query"].to_numpy()


def build_catalog(events: pd.DataFrame, embed=None, cache_dir: str | Path | None = None) -> Catalog:
    """Every (query, item) of ``events``, embedded by ``embed(texts) -> (n, D)`` (default the
    project's MiniLM, :func:`streamml.embed.embed_texts`). Embeddings are cached by the texts'
    hash under ``cache_dir`` (default ``~/.cache/streamml``), outside the repository: they are
    derived from the log, which may not be redistributable."""
    if "text" not in events:
        raise LogError("events: a replay embeds item texts, so the log needs a text column")
    items = events.drop_duplicates(["query", "item"])[["query", "item", "text"]].sort_values(
        ["query", "item"], kind="stable").reset_index(drop=True)
    texts = items.text.astype(str).tolist()
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    cache = Path(cache_dir or Path.home() / ".cache" / "streamml") / f"embeddings-{digest}.npy"
    if cache.is_file():
        X = np.load(cache)
    else:
        if embed is None:
            from streamml.embed import embed_texts as embed
        unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        X = np.asarray(embed(list(unique)), np.float32)[inverse]
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, X)
    index = {(q, i): n for n, (q, i) in enumerate(zip(items["query"], items["item"]))}
    return Catalog(items, X, index, digest)


def head_labels(events: pd.DataFrame, catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """The head's training rows from the population's events: ``(ids, y)``, one row per catalog
    item with any event, labelled by :func:`median_labels`."""
    ids = events.apply(lambda r: catalog.index[(r["query"], r["item"])], axis=1).to_numpy() if len(events) else np.array([], int)
    return median_labels(ids, events.label.to_numpy(np.float64), catalog.item_query)


def median_labels(ids: np.ndarray, labels: np.ndarray, item_query: np.ndarray,
                  weights: np.ndarray | None = None, with_rate: bool = False) -> tuple[np.ndarray, ...]:
    """The rule that turns feedback into a head's labels: ``(items, y)``, one row per item with
    any answer, accepted when its accept rate is at or above the median accept rate of its
    query's items (so each query's head sees both classes in about equal numbers).

    ``weights`` (default 1) make each item's rate a weighted mean, ``sum w*label / sum w``: the
    learning loop passes inverse propensities (:mod:`streamml.loop.retrain`). ``with_rate``: also
    return each item's rate."""
    w = np.ones(len(ids)) if weights is None else np.asarray(weights, np.float64)
    num = pd.Series(w * np.asarray(labels, np.float64)).groupby(np.asarray(ids)).sum()
    rate = num / pd.Series(w).groupby(np.asarray(ids)).sum()
    query = np.asarray(item_query)[rate.index.to_numpy()]
    median = rate.groupby(query).transform("median")
    out = rate.index.to_numpy(np.int64), (rate >= median).astype(np.int8).to_numpy()
    return (*out, rate.to_numpy()) if with_rate else out


# --------------------------------------------------------------------------- keys and replay
@dataclass
class Key:
    """One (user, query) of the replay: its stream and probe, as catalog ids and labels."""

    user: str
    query: str
    stream: np.ndarray
    stream_labels: np.ndarray
    probe: np.ndarray
    probe_labels: np.ndarray


def make_keys(events: pd.DataFrame, catalog: Catalog, users: set, min_events: int = 30,
              probe_fraction: float = 1 / 3) -> list[Key]:
    """The keys of ``users`` with at least ``min_events`` events and both labels among the
    probe's, in a fixed order (user, query). Events in time order, ties broken by item id."""
    part = events[events.user.astype(str).isin(users)].copy()
    part["id"] = [catalog.index[(q, i)] for q, i in zip(part["query"], part["item"])]
    part = part.sort_values(["user", "query", "time", "item"], kind="stable")
    keys = []
    for (user, query), rows in part.groupby(["user", "query"], sort=True):
        if len(rows) < min_events:
            continue
        n_probe = int(np.ceil(probe_fraction * len(rows)))
        ids, labels = rows.id.to_numpy(np.int64), rows.label.to_numpy(np.int8)
        if len(set(labels[-n_probe:].tolist())) < 2:
            continue
        keys.append(Key(str(user), str(query), ids[:-n_probe], labels[:-n_probe], ids[-n_probe:], labels[-n_probe:]))
    return keys


def shuffle_labels(keys: list[Key], seed: int = 0) -> list[Key]:
    """The control: each key's labels permuted over its stream and probe together (the items and
    their order stay), so no learner can beat chance; keys left with one probe label are dropped."""
    out = []
    for n, key in enumerate(keys):
        labels = np.random.default_rng([seed, n]).permutation(np.concatenate([key.stream_labels, key.probe_labels]))
        s = len(key.stream)
        if len(set(labels[s:].tolist())) == 2:
            out.append(Key(key.user, key.query, key.stream, labels[:s], key.probe, labels[s:]))
    return out


def replay(learners: dict, keys: list[Key], checkpoints=CHECKPOINTS, progress: bool = True) -> pd.DataFrame:
    """Each learner (already built and fitted on the population) learns every key's stream in
    order; one row per (learner, key, checkpoint reached) with the probe AUC, and one at 0 events
    (before any feedback). The head's AUC on the key's whole stream is kept as ``head_stream_auc``
    for the subgroups."""
    rows = []
    for name, learner in learners.items():
        for key in tqdm(keys, desc=f"replay: {name}", unit="key", leave=False, disable=not progress):
            done = 0
            for c in (0, *checkpoints):
                if c > len(key.stream):
                    break
                if c > done:
                    n = c - done
                    learner.learn_many(np.full(n, key.user, object), np.full(n, key.query, object),
                                       key.stream[done:c], key.stream_labels[done:c])
                    done = c
                scores = np.asarray(learner.score(key.user, key.query, key.probe), np.float64)
                rows.append({"learner": name, "user": key.user, "query": key.query, "events": c,
                             "probe_auc": float(roc_auc_score(key.probe_labels, scores))})
            learner.forget(key.user, key.query)
    return pd.DataFrame(rows)


def clustered_se(values: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of the mean of ``values`` with observations correlated within
    ``clusters`` (the sandwich estimator with the G/(G-1) small-sample factor)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan")
    resid = pd.Series(values - values.mean()).groupby(np.asarray(clusters)).sum().to_numpy()
    g = len(resid)
    return float(np.sqrt(g / max(g - 1, 1) * np.sum(resid**2)) / len(values))


def summarize(rounds: pd.DataFrame, head_stream_auc: pd.Series, reference: str = "head_only",
              checkpoints=CHECKPOINTS) -> pd.DataFrame:
    """One row per (learner, checkpoint, group): ``n`` keys, ``users``, mean probe AUC and its
    user-clustered SE, and the paired difference to ``reference`` with its SE. Groups are
    ``all``, ``head_good`` and ``head_bad`` (``head_stream_auc`` per (user, query) at or above,
    and below, its median over the keys)."""
    median = head_stream_auc.median()
    out = []
    ref = rounds[rounds.learner == reference].set_index(["user", "query", "events"]).probe_auc
    for (name, c), part in rounds.groupby(["learner", "events"], sort=False):
        part = part.set_index(["user", "query"])
        good = head_stream_auc.reindex(part.index).to_numpy() >= median
        for group, mask in (("all", np.ones(len(part), bool)), ("head_good", good), ("head_bad", ~good)):
            sub = part[mask]
            users = sub.index.get_level_values("user").to_numpy()
            diff = sub.probe_auc.to_numpy() - ref.reindex([(u, q, c) for u, q in sub.index]).to_numpy()
            out.append({"learner": name, "events": c, "group": group, "n": len(sub), "users": len(set(users)),
                        "probe_auc": sub.probe_auc.mean(), "se": clustered_se(sub.probe_auc.to_numpy(), users),
                        "lift": diff.mean(), "lift_se": clustered_se(diff, users)})
    return pd.DataFrame(out)
