"""Sample-quality metrics on feature vectors, pure numpy in float64: FID and KID.

Both compare two sets of (N, D) features, e.g. Inception-V3 pool features of generated and training
images. KID is the figure to trust at small N (unbiased); FID is biased upwards when N is small
against D, so only compare FIDs computed at the same N.
"""

from __future__ import annotations

import numpy as np

from ..errors import MetricError

GRAM_LIMIT = 3000  # KID precomputes the kernel of all rows up to this many (3000² float64: 72 MB)


def _check_features(feats, name: str, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise MetricError(f"{name}: expected features of shape (N, D), got {feats.shape}")
    if len(feats) < min_rows:
        raise MetricError(f"{name}: {len(feats)} images, at least {min_rows} needed")
    if not np.all(np.isfinite(feats)):
        raise MetricError(f"{name}: the features contain NaN or infinite values")
    return feats


def _check_pair(feats_a, feats_b, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    a = _check_features(feats_a, "first set", min_rows)
    b = _check_features(feats_b, "second set", min_rows)
    if a.shape[1] != b.shape[1]:
        raise MetricError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return a, b


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of (N, D) features, covariance with N - 1 as in the FID papers."""
    feats = _check_features(feats, "features", 2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (round-off negatives -> 0)."""
    eigval, eigvec = np.linalg.eigh((sigma + sigma.T) / 2)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    # d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) (Dowson & Landau 1982; Heusel et al. 2017). S1 S2 is
    # not symmetric, but it is similar to S1^½ S2 S1^½, which is symmetric PSD: same eigenvalues, so
    # tr (S1 S2)^½ = sum of their square roots, computed with eigh (no scipy.linalg.sqrtm needed).
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigval = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigval, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt, 0.0))


def fid(feats_a, feats_b) -> float:
    """Fréchet Inception Distance between two (N, D) feature sets (Heusel et al. 2017)."""
    a, b = _check_pair(feats_a, feats_b, 2)
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³, the cubic kernel of KID (Bińkowski et al. 2018), for all row pairs."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD² between the distributions of rows of x and y (the U-statistic)."""
    return _mmd2_from_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


def _mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    m, n = len(k_xx), len(k_yy)
    # Dropping the diagonals k(x_i, x_i) is what makes it unbiased (Gretton et al. 2012, Eq. 3):
    # they would add (E k(x, x) - E k(x, x')) / m > 0 to every estimate.
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of unbiased MMD² over random subsets of both sets.

    Each subset draws `min(subset_size, N_a, N_b)` rows of each set without replacement, as
    torch-fidelity and clean-fid do; the std is over subsets (their spread, not the mean's error; it
    shrinks to the other set's share alone when a set is no larger than the subset).
    """
    a, b = _check_pair(feats_a, feats_b, 2)
    if subsets < 1 or subset_size < 2:
        raise MetricError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    draws = [(rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)) for _ in range(subsets)]
    if len(a) + len(b) <= GRAM_LIMIT:
        # Small sets (the usual case during training): one kernel matrix, then each subset is a gather
        # instead of three m x m x D products; same numbers.
        gram = polynomial_kernel(np.concatenate([a, b]), np.concatenate([a, b]))
        k_aa, k_bb, k_ab = gram[:len(a), :len(a)], gram[len(a):, len(a):], gram[:len(a), len(a):]
        estimates = [_mmd2_from_kernels(k_aa[np.ix_(ia, ia)], k_bb[np.ix_(ib, ib)], k_ab[np.ix_(ia, ib)])
                     for ia, ib in draws]
    else:
        estimates = [mmd2_unbiased(a[ia], b[ib]) for ia, ib in draws]
    return float(np.mean(estimates)), float(np.std(estimates))
