"""What is transferred, measured without training a transfer: the math of the sweep's diagnostics.

Pure numpy / scikit-learn / scipy, no torch, no Ray; raytransfer/features.py supplies the features.
- Layer similarity: linear CKA (Kornblith et al. 2019) with the minibatch estimator of Nguyen, Raghu &
  Kornblith 2021: the unbiased HSIC_1 (Song et al. 2012) summed over minibatches, so memory holds one
  minibatch's Gram matrices, never all images' features.
- Linear probes (Alain & Bengio 2016): scikit-learn's logistic regression on standardised features.
- Transferability estimators, from a source net's features (and softmax) on the target's labelled
  images: H-score (Bao et al. 2019; covariance shrunk by Ledoit-Wolf as in the regularised H-score of
  Ibrahim et al. 2022, since a layer can have more units than images), LogME (You et al. 2021, the
  fixed-point evidence maximisation of their Algorithm 1; PyPI's `logme` is an unrelated logging
  package, so it is written here after the authors' reference code, github.com/thuml/LogME), LEEP
  (Nguyen et al. 2020).
The CKA packages on PyPI (cka-pytorch, pytorch-cka, ckatorch; torch-cka, last released 2021) each drive
two models and a torch DataLoader through their own hooks and say they are for academic use; here one
diagnostic compares up to 30 nets on FFCV loaders, layer pair by layer pair, from Gram matrices kept per
minibatch. Each formula is a few lines, so they are written here and checked on known values in the tests.

    acc = CKAAccumulator(); acc.add("A/conv1", "B/conv1", gram(xa), gram(xb)); acc.cka("A/conv1", "B/conv1")
    logme(features, labels); h_score(features, labels); leep(source_probs, labels)
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np


# ---------------------------------------------------------------------------------------------
# Layer similarity: minibatch linear CKA

def gram(x) -> np.ndarray:
    """The linear-kernel Gram matrix (m x m, float64) of a minibatch of features, any shape (m, ...).
    Centred first: HSIC_1 of a linear kernel ignores a shift of the features, centring only keeps
    float64 from cancelling large post-ReLU means."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x - x.mean(0, keepdims=True)
    return x @ x.T


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator of two m x m Gram matrices (Song et al. 2012, eq. 5; m >= 4)."""
    m = k.shape[0]
    if m < 4:
        raise ValueError(f"HSIC_1 needs minibatches of at least 4 examples; got {m}")
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    k1, l1 = k.sum(1), l.sum(1)
    value = (np.sum(k * l) + k1.sum() * l1.sum() / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * (k1 @ l1))
    return float(value / (m * (m - 3)))


class CKAAccumulator:
    """Minibatch CKA (Nguyen et al. 2021): CKA(X, Y) = sum_i HSIC_1(K_i, L_i) /
    sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i)) over minibatches i. Representations are
    named ("net/layer"); each one's self term is counted once per minibatch however many pairs use it."""

    def __init__(self):
        self.cross = defaultdict(float)
        self.self_terms = defaultdict(float)
        self._seen = set()                 # (representation, minibatch) whose self term is in

    def add(self, a: str, b: str, k: np.ndarray, l: np.ndarray, batch: int = 0):
        self.cross[(a, b)] += hsic1(k, l)
        for name, g in ((a, k), (b, l)):
            if (name, batch) not in self._seen:
                self._seen.add((name, batch))
                self.self_terms[name] += hsic1(g, g)

    def cka(self, a: str, b: str) -> float:
        denominator = np.sqrt(max(self.self_terms[a], 0.0) * max(self.self_terms[b], 0.0))
        return float(self.cross[(a, b)] / denominator) if denominator > 0 else float("nan")


def linear_cka(x, y, batch_size: int | None = None) -> float:
    """CKA of two representations of the same examples (rows), over minibatches of `batch_size`
    (None: one batch of all rows; a last batch under 4 rows is left out)."""
    x, y = np.asarray(x), np.asarray(y)
    step = batch_size or len(x)
    acc = CKAAccumulator()
    for i, start in enumerate(range(0, len(x) - 3, step)):
        acc.add("x", "y", gram(x[start:start + step]), gram(y[start:start + step]), batch=i)
    return acc.cka("x", "y")


# ---------------------------------------------------------------------------------------------
# Linear probes

def probe_accuracy(train_x, train_y, val_x, val_y, c: float = 1.0, max_iter: int = 300) -> float:
    """Top-1 on (val_x, val_y) of a logistic-regression probe fitted on (train_x, train_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    return float(probe.score(np.asarray(val_x, dtype=np.float64), np.asarray(val_y)))


# ---------------------------------------------------------------------------------------------
# Transferability estimators

def h_score(features, labels) -> float:
    """H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f | y])), with cov(f) shrunk by Ledoit-Wolf."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(0, keepdims=True)
    y = np.asarray(labels)
    cov_f = LedoitWolf(assume_centered=True).fit(f).covariance_
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    cov_g = g.T @ g / len(f)
    return float(np.trace(np.linalg.solve(cov_f, cov_g)))


def logme(features, labels, max_iter: int = 11, tol: float = 0.01) -> float:
    """LogME (You et al. 2021): the log marginal evidence per example of Bayesian linear regression
    from the features to each one-hot label column, maximised over its prior (alpha) and noise (beta)
    precisions by their fixed point, averaged over the classes. Higher: a better feature."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2                                   # the nonzero eigenvalues of F^T F (rank r = len(s))
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        z = u.T @ t                                  # t in the singular basis
        outside = max(float(t @ t - z @ z), 0.0)     # the part of t no feature can explain
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
            m_sq = float(np.sum((beta * s * z / (alpha + beta * sigma)) ** 2))              # |m|^2
            residual = float(np.sum((z * alpha / (alpha + beta * sigma)) ** 2)) + outside   # |t - F m|^2
            new_alpha = gamma / (m_sq + 1e-5)
            new_beta = (n - gamma) / (residual + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < tol
            alpha, beta = new_alpha, new_beta
            if done:
                break
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))
        m_sq = float(np.sum((beta * s * z / (alpha + beta * sigma)) ** 2))
        residual = float(np.sum((z * alpha / (alpha + beta * sigma)) ** 2)) + outside
        log_det = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * residual
                    - alpha / 2 * m_sq - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep(source_probs, labels) -> float:
    """LEEP (Nguyen et al. 2020): mean log of the expected empirical prediction. `source_probs` (n, Z):
    the source net's softmax over its own Z classes on the target's images; `labels` (n,) target labels."""
    p = np.asarray(source_probs, dtype=np.float64)
    y = np.asarray(labels)
    classes, y_index = np.unique(y, return_inverse=True)
    joint = np.zeros((len(classes), p.shape[1]))
    np.add.at(joint, y_index, p)
    joint /= len(p)                                          # P(y, z)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)   # P(y | z)
    expected = np.sum(p * conditional[y_index], axis=1)      # sum_z P(y_i | z) theta(z | x_i)
    return float(np.mean(np.log(expected)))


# The independent unit of every interval and pairing (the findings, figure 4's bootstrap, the estimators): one
# split (kind, seed, label), one training seed, one target half. Every network of a unit starts from that unit's
# bases, so networks inside it are not independent draws. analysis.results.UNIT is this one.
UNIT = ("split_kind", "split_seed", "split", "seed", "target_half")
ESTIMATOR_UNIT = list(UNIT)      # one estimate per layer n of each unit


def estimator_pairs(measured, estimates, estimator: str):
    """Measured rows (DataFrame with ESTIMATOR_UNIT and n) beside one estimator's values: at the same n,
    split, training seed and target half; LEEP, one value per split x seed x target half, beside every n.
    How transferability.json and the report's scatter both pair them."""
    if estimator == "leep":
        return measured.merge(estimates[ESTIMATOR_UNIT + ["value"]], on=ESTIMATOR_UNIT)
    return measured.merge(estimates[ESTIMATOR_UNIT + ["n", "value"]].astype({"n": "int64"}),
                          on=ESTIMATOR_UNIT + ["n"])


def kendall_tau(x, y) -> tuple[float, float, int]:
    """Kendall's tau-b of two paired sequences, its two-sided p-value and the number of pairs used
    (pairs with a NaN left out); NaNs where fewer than 3 pairs remain or a side is constant."""
    from scipy.stats import kendalltau

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), int(len(x))
    result = kendalltau(x, y)
    return float(result.statistic), float(result.pvalue), int(len(x))
