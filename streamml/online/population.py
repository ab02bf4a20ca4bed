"""What a population's logged feedback teaches before any one user is seen: GLMix's fixed effects
and the prior of its random effects, fitted without a grid.

:func:`fit_population` takes the population's events (``user, query, item, label, time``;
``item`` a catalog row) and the catalog, and returns a :class:`Population`:

* **The global model** (GLMix's fixed effect): ``logit P(accept) = slope * z + intercept + beta_i``.
  ``z`` is the head's score standardised per query; ``slope`` and ``intercept`` come from a
  logistic regression of the population's labels on ``z`` (the head was trained on a
  different target, an item's accept rate against its query's median, so its scale is not a
  log-odds); ``beta_i`` is a per-item effect, shrunk toward the head by a Gaussian prior whose
  variance is the empirical-Bayes (EM) estimate over items, so an item with few events keeps
  about the head's score and an item with many keeps what the population said of it.
* **Collaborative factors**: each distinct text's ``k`` factors, from sklearn's
  ``TruncatedSVD`` of the population's user x text matrix of labels (+1 / -1, each user's
  mean removed, 0 unseen), scaled to unit mean norm. Texts are identified by their
  embedding, so a movie listed under two queries is one column. Items that no population
  user answered get factors, and an item effect, predicted from their embedding by ridge
  regression (``RidgeCV``, its penalty chosen by leave-one-out), so raw texts still score.
  A population in which no text was answered by two users has no collaborative signal: its
  factors are then each query's principal directions of the texts (as ``factors="embedding"``),
  and the prior below is still estimated on them.
* **The random effects' prior** (per key: a bias and a weight on the factors): a zero-mean
  Gaussian whose covariance is the EM estimate over the population's (user, query) keys:
  each key's Laplace posterior under the current prior, then the prior's covariance set to
  the mean of the keys' ``m m^T + S`` (the M step of the type-II maximum likelihood of a
  Gaussian random-effects model), until it stops moving. No setting is tried on anyone's
  outcomes: the population's own likelihood chooses it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["Population", "embedding_factors", "fit_population", "standardized_head", "text_ids"]


@dataclass
class Population:
    """A population fit: the global model's parts and the random effects' prior (see module doc)."""

    slope: float
    intercept: float
    item_effect: np.ndarray  # (n_items,)
    factors: np.ndarray  # (n_items, k) float32
    prior_cov: np.ndarray  # (1 + k, 1 + k): bias, then factor weights
    n_events: int
    fingerprint: str
    history: dict = field(default_factory=dict)  # EM traces, for the record

    @property
    def k(self) -> int:
        return self.factors.shape[1]

    def offset(self, z: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """The global model's log-odds of catalog ``items`` (all items when ``None``) with head ``z``."""
        beta = self.item_effect if items is None else self.item_effect[items]
        return self.slope * z + self.intercept + beta


def standardized_head(head_scores: np.ndarray, q_code: np.ndarray) -> np.ndarray:
    """The head's scores z-scored per query over the catalog (a constant head gets std 1)."""
    h = np.asarray(head_scores, np.float64)
    count = np.bincount(q_code)
    mean = np.bincount(q_code, h) / count
    std = np.sqrt(np.bincount(q_code, (h - mean[q_code]) ** 2) / count)
    std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1), std, 1.0)
    return (h - mean[q_code]) / std[q_code]


def text_ids(X: np.ndarray) -> np.ndarray:
    """(n,) the id of each row's distinct embedding: rows with equal embeddings are one text."""
    _, inverse = np.unique(np.ascontiguousarray(X).view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))),
                           return_inverse=True)
    return inverse.ravel()


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _item_effects(ids: np.ndarray, labels: np.ndarray, offset: np.ndarray, n_items: int, iters: int = 50):
    """Per-item effects shrunk by an EM-estimated prior variance; returns (effects, variance, trace)."""
    var, beta, trace = 1.0, np.zeros(n_items), []
    seen = np.bincount(ids, minlength=n_items) > 0
    for _ in range(iters):
        for _ in range(5):  # Newton on each item's effect given the prior (items are independent)
            p = _sigmoid(offset + beta[ids])
            g = np.bincount(ids, labels - p, minlength=n_items) - beta / var
            h = np.bincount(ids, p * (1 - p), minlength=n_items) + 1 / var
            beta += g / h
        new = float(np.mean(beta[seen] ** 2 + 1 / h[seen]))
        trace.append(new)
        if abs(new - var) < 1e-4 * var:
            var = new
            break
        var = new
    return beta, var, trace


def _als_factors(users: np.ndarray, text: np.ndarray, labels: np.ndarray, n_texts: int, k: int, seed: int):
    """(n_texts, k) item factors of ``implicit``'s ALS on which texts each user answered (accept or
    reject: choosing to read an item says something of taste too); unseen texts get NaN."""
    import scipy.sparse as sps
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    frame = pd.DataFrame({"u": users, "t": text}).drop_duplicates()
    u_code, _ = pd.factorize(frame.u)
    M = sps.csr_matrix((np.ones(len(frame), np.float32), (u_code, frame.t.to_numpy())), shape=(u_code.max() + 1, n_texts))
    with threadpool_limits(1, "blas"):  # implicit runs its own threads, and says so if BLAS does too
        model = AlternatingLeastSquares(factors=k, regularization=0.1, iterations=30, random_state=seed,
                                        calculate_training_loss=False)
        model.fit(M, show_progress=False)
    V = np.asarray(model.item_factors, np.float64)[:, :k]
    seen = np.bincount(frame.t.to_numpy(), minlength=n_texts) > 0
    V /= np.linalg.norm(V[seen], axis=1).mean()
    V[~seen] = np.nan
    return V


def _svd_factors(users: np.ndarray, text: np.ndarray, labels: np.ndarray, n_texts: int, k: int, seed: int):
    """(n_texts, k) factors from the SVD of the user x text label matrix; unseen texts get NaN."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    frame = pd.DataFrame({"u": users, "t": text, "y": np.where(labels > 0, 1.0, -1.0)}).groupby(["u", "t"]).y.mean().reset_index()
    u_code, _ = pd.factorize(frame.u)
    y = frame.y.to_numpy() - frame.groupby(u_code).y.transform("mean").to_numpy()
    M = csr_matrix((y, (u_code, frame.t.to_numpy())), shape=(u_code.max() + 1, n_texts))
    k = int(min(k, min(M.shape) - 1))
    svd = TruncatedSVD(k, random_state=seed).fit(M)
    V = svd.components_.T * np.sqrt(svd.singular_values_)
    seen = np.bincount(frame.t.to_numpy(), minlength=n_texts) > 0
    V /= np.linalg.norm(V[seen], axis=1).mean()
    V[~seen] = np.nan
    return V


FACTORS = {"svd": _svd_factors, "als": _als_factors}


def embedding_factors(X: np.ndarray, q_code: np.ndarray, k: int) -> np.ndarray:
    """(n, k) each item's coordinates on its query's top ``k`` principal directions, scaled to unit
    root mean square norm per query: the embedding in place of collaborative factors."""
    V = np.zeros((len(X), k))
    for q in np.unique(q_code):
        rows = q_code == q
        Xc = X[rows].astype(np.float64) - X[rows].mean(0)
        _, _, vt = np.linalg.svd(Xc, full_matrices=False)
        P = Xc @ vt[:k].T
        V[rows, : P.shape[1]] = P / max(np.sqrt((P**2).sum(1).mean()), 1e-12)
    return V


def _key_posteriors(F: np.ndarray, y: np.ndarray, offset: np.ndarray, starts: np.ndarray, prior: np.ndarray,
                    m: np.ndarray, iters: int = 2):
    """Laplace posteriors (means (K, d), covariances (K, d, d)) of every key's random effect, by
    Newton from ``m``; events are sorted by key, key ``j``'s from ``starts[j]``."""
    P = np.linalg.inv(prior)
    outer = F[:, :, None] * F[:, None, :]
    lengths = np.diff(np.append(starts, len(F)))
    for _ in range(iters):  # all keys at once, one batched solve per step
        p = _sigmoid(offset + np.einsum("nd,nd->n", F, np.repeat(m, lengths, axis=0)))
        g = np.add.reduceat(F * (y - p)[:, None], starts) - m @ P
        H = np.add.reduceat(outer * (p * (1 - p))[:, None, None], starts) + P
        m = m + np.linalg.solve(H, g[:, :, None])[:, :, 0]
    return m, np.linalg.inv(H)


def fit_population(events: pd.DataFrame, items: np.ndarray, item_query_code: np.ndarray, z: np.ndarray,
                   k: int = 8, seed: int = 0, em_iters: int = 200, factors: str = "svd", trust: bool = False) -> Population:
    """Fit the global model, the item factors and the random effects' prior (module doc).

    ``events`` has columns ``user, query, item, label`` (``item`` a row of ``items``, whose
    query is ``item_query_code``); ``z`` is the standardised head of every item. ``factors``:
    ``"svd"`` (of the labels), ``"als"`` (``implicit``'s ALS on who answered what) or
    ``"embedding"`` (each query's principal directions of the texts: no collaborative signal).
    ``trust``: the global model's log-odds, standardised, becomes the first factor, so each
    key also learns how far it follows the population.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV

    if len(events) == 0:
        raise ValueError("fit_population needs events: the population's feedback is empty")
    ids = events["item"].to_numpy(np.int64)
    y = events["label"].to_numpy(np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("fit_population needs both accepts and rejects among the events")
    glm = LogisticRegression(C=1e4).fit(z[ids, None], y)
    slope, intercept = float(glm.coef_[0, 0]), float(glm.intercept_[0])
    beta, beta_var, beta_trace = _item_effects(ids, y, slope * z[ids] + intercept, len(items))

    text = text_ids(items)
    if factors not in (*FACTORS, "embedding"):
        raise ValueError(f"factors must be one of {sorted((*FACTORS, 'embedding'))}, got {factors!r}")
    shared = pd.DataFrame({"u": events["user"].to_numpy(), "t": text[ids]}).drop_duplicates().t.duplicated().any()
    if factors == "embedding" or not shared:  # no collaborative signal (no text answered by two users): each
        V = embedding_factors(items, item_query_code, k)  # query's top principal directions of its texts
    else:
        V_text = FACTORS[factors](events["user"].astype(str).to_numpy(), text[ids], y, text.max() + 1, k, seed)
        V = V_text[text]
    seen_item = np.bincount(ids, minlength=len(items)) > 0
    seen_text = ~np.isnan(V[:, 0])
    if (~seen_text).any():  # unseen texts: factors from the embedding
        V[~seen_text] = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(items[seen_text], V[seen_text]).predict(items[~seen_text])
    if (~seen_item).any():  # unseen items: effect from the embedding (about zero when the head already says it)
        beta[~seen_item] = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(items[seen_item], beta[seen_item]).predict(items[~seen_item])
    if trust:
        o = slope * z + intercept + beta
        V = np.hstack([((o - o.mean()) / max(o.std(), 1e-12))[:, None], V])
    V = V.astype(np.float32)

    key = pd.factorize(pd.Series(list(zip(events["user"].astype(str), item_query_code[ids]))))[0]
    order = np.argsort(key, kind="stable")
    starts = np.searchsorted(key[order], np.arange(key.max() + 1))
    F = np.hstack([np.ones((len(ids), 1)), V[ids[order]]])
    offset = slope * z[ids[order]] + intercept + beta[ids[order]]
    prior, trace = np.eye(1 + V.shape[1]) * 0.1, []
    m = np.zeros((len(starts), F.shape[1]))
    for _ in range(em_iters):
        m, S = _key_posteriors(F, y[order], offset, starts, prior, m)
        new = (np.einsum("ki,kj->ij", m, m) + S.sum(0)) / len(m)
        step = np.abs(new - prior).max()
        prior = (new + new.T) / 2
        trace.append(float(np.trace(prior)))
        if step < 1e-3 * np.abs(prior).max():
            break
    digest = hashlib.sha256(np.ascontiguousarray(events[["item", "label"]].to_numpy(np.int64)).tobytes()).hexdigest()[:16]
    return Population(slope, intercept, beta, V, prior, len(events), digest,
                      {"item_effect_var": beta_var, "item_effect_trace": beta_trace, "prior_trace": trace,
                       "factors": factors if shared else "embedding"})
