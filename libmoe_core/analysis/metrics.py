"""Metric definitions (natural log throughout). Pure functions on numpy arrays.

Per-token functions take ``[n, width]`` arrays and return ``[n]``; per-layer
functions take the accumulated counts of one layer.
"""

from __future__ import annotations

import math

import numpy as np

_TINY = np.float32(1e-30)


# --------------------------------------------------------------------------- per token


def row_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy -sum p ln p of each row of ``p`` [n, E] (rows taken as given; 0 ln 0 = 0)."""
    p = np.asarray(p, dtype=np.float32)
    return -(p * np.log(np.maximum(p, _TINY))).sum(axis=1)


def renormalised(weights: np.ndarray) -> np.ndarray:
    """|w| / sum |w| per row: the top-k weights as a distribution over the chosen k."""
    w = np.abs(np.asarray(weights, dtype=np.float32))
    total = w.sum(axis=1, keepdims=True)
    return w / np.maximum(total, _TINY)


def topk_weight_entropy(weights: np.ndarray) -> np.ndarray:
    """Entropy of the renormalised top-k weights per token (max ln k)."""
    return row_entropy(renormalised(weights))


def margin(weights: np.ndarray) -> np.ndarray:
    """Largest minus second-largest renormalised top-k weight per token (1 when k = 1).

    Equals w1 - w2 when the weights come in rank order (best first).
    """
    w = renormalised(weights)
    if w.shape[1] == 1:
        return np.ones(w.shape[0], dtype=np.float32)
    if w.shape[1] == 2:
        return np.abs(w[:, 0] - w[:, 1])
    top2 = -np.partition(-w, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


# --------------------------------------------------------------------------- per layer


def entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution proportional to ``counts``."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum())


def load_shares(counts: np.ndarray) -> np.ndarray:
    """Share of the routing slots that went to each expert (sums to 1)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def load_cv(counts: np.ndarray) -> float:
    """Coefficient of variation std/mean of the E loads (population std)."""
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean()
    return float(c.std() / mean) if mean > 0 else 0.0


def max_load_ratio(counts: np.ndarray) -> float:
    """Largest load share divided by the ideal share 1/E (1 = balanced, E = all on one)."""
    shares = load_shares(counts)
    return float(shares.max() * len(shares)) if shares.sum() > 0 else 0.0


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the E load shares: 0 balanced, (E-1)/E all on one expert."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * (ranks * x).sum() / (n * total) - (n + 1) / n)


def normalised_entropy(counts: np.ndarray) -> float:
    """Entropy of the distribution proportional to ``counts`` divided by ln E (nan when E = 1)."""
    n = len(counts)
    return entropy(counts) / math.log(n) if n > 1 else float("nan")


def mutual_information(joint: np.ndarray) -> float:
    """I(X; Y) in nats from a joint count table [X, Y]."""
    j = np.asarray(joint, dtype=np.float64)
    total = j.sum()
    if total <= 0:
        return 0.0
    p = j / total
    px = p.sum(axis=1, keepdims=True)
    py = p.sum(axis=0, keepdims=True)
    if (px > 0).sum() <= 1 or (py > 0).sum() <= 1:
        return 0.0
    nz = p > 0
    return max(0.0, float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum()))


def normalised_mutual_information(joint: np.ndarray) -> float:
    """I(X; Y) / min(H(X), H(Y)) in [0, 1] (0 when either marginal is constant)."""
    j = np.asarray(joint, dtype=np.float64)
    hx, hy = entropy(j.sum(axis=1)), entropy(j.sum(axis=0))
    denom = min(hx, hy)
    return mutual_information(j) / denom if denom > 0 else 0.0
