"""Memorisation report: each sample's nearest training image in pixel and feature space, flip-aware.

Pure numpy (no TensorFlow): features come in as arrays. Training runs flip images left-right, so a
mirrored training image is as much a copy as the image itself; every search also tries the mirrors.

Near-copy rule (per space): a sample is a near-copy when its nearest-training distance is at most
`ratio` (0.5) times the `quantile` (5th percentile) of the training set's own leave-one-out nearest
distances (each training image to its closest *other* training image or that one's mirror).
Why: the train-to-train distances say how close two distinct images of this data set naturally get,
in this space and at this resolution, so the rule needs no absolute constant. A quantile alone
(ratio 1) would flag about 5 % of perfectly fresh samples drawn from the training distribution by
construction; halving it leaves a margin that fresh samples almost never cross (distances
concentrate in high dimensions), while copies and light edits of a training image (distance about
0) always do. The 5th percentile rather than the minimum keeps a few near-duplicates inside the
training set from shrinking the threshold; exact duplicates (distance 0) are left out of it.
Checked on ORL faces at 32x32 (360 training, 40 held out): no held-out photo and none of 64 demo
samples is flagged in pixel space, every planted copy is, also with +-3 grey levels of noise.
Pixel space misses shifted copies (a 1-pixel shift is as far as a typical neighbour): that is what
the feature space is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import make_grid, save_png

PERCENTILES = (5, 50, 95)


@dataclass(frozen=True)
class Neighbours:
    """For each query: the nearest training image's index, the distance, and whether it was mirrored."""

    index: np.ndarray  # (Q,) int
    distance: np.ndarray  # (Q,) float64
    flipped: np.ndarray  # (Q,) bool


def flip_images(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) images mirrored left-right."""
    return np.ascontiguousarray(np.asarray(images)[:, :, ::-1, :])


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, D) float32 scaled so L2 distances are RMS pixel differences in [0, 1]."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / (255.0 * np.sqrt(flat.shape[1], dtype=np.float32))


def feature_vectors(feats: np.ndarray) -> np.ndarray:
    """(N, D) features -> unit length, so L2 distance is sqrt(2 - 2 cos): scale-free, cosine-ordered."""
    feats = np.asarray(feats, dtype=np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(queries, train, train_flipped=None, *, exclude=None, chunk: int = 256) -> Neighbours:
    """Nearest row of `train` (or of `train_flipped`, its mirrors) for each row of `queries`, by L2.

    `exclude[q]` is a training index query q may not match, nor its mirror (leave-one-out).
    """
    queries, train = np.asarray(queries, np.float32), np.asarray(train, np.float32)
    candidates = train if train_flipped is None else np.concatenate([train, np.asarray(train_flipped, np.float32)])
    n = len(train)
    cand_sq = np.einsum("ij,ij->i", candidates, candidates)
    best = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), chunk):
        q = queries[lo:lo + chunk]
        # Squared distances up to the per-query constant |q|², which does not change the argmin.
        d2 = cand_sq[None, :] - 2.0 * (q @ candidates.T)
        if exclude is not None:
            rows = np.arange(len(q))
            own = np.asarray(exclude[lo:lo + chunk])
            d2[rows, own] = np.inf
            if train_flipped is not None:
                d2[rows, own + n] = np.inf
        best[lo:lo + chunk] = np.argmin(d2, axis=1)
    # The float32 expansion above loses precision by cancellation; recompute the chosen pairs exactly,
    # so a copy reports a distance of 0, not 1e-4.
    diff = queries.astype(np.float64) - candidates[best].astype(np.float64)
    return Neighbours(best % n, np.sqrt(np.einsum("ij,ij->i", diff, diff)), best >= n)


def train_nearest(train, train_flipped=None, *, max_queries: int = 1000, seed: int = 0) -> np.ndarray:
    """Leave-one-out nearest distances of (a random subset of at most `max_queries`) training rows."""
    n = len(train)
    if n < 2:
        raise ValueError(f"the memorisation report needs at least 2 training images, got {n}")
    # A subset keeps the cost at max_queries x N instead of N² on large data sets.
    queries = np.sort(np.random.default_rng(seed).choice(n, min(n, max_queries), replace=False))
    return nearest_neighbours(np.asarray(train)[queries], train, train_flipped, exclude=queries).distance


def copy_threshold(train_nn: np.ndarray, quantile: float = 0.05, ratio: float = 0.5) -> float:
    """The near-copy distance: `ratio` x the `quantile` of the positive train-to-train distances."""
    positive = train_nn[train_nn > 0]
    return float(ratio * np.quantile(positive, quantile)) if len(positive) else 0.0


@dataclass(frozen=True)
class SpaceMatch:
    """Sample-to-training matches in one space ("pixel" or "feature") and the threshold applied there."""

    space: str
    neighbours: Neighbours  # sample -> nearest training image
    train_nn: np.ndarray  # training image -> nearest other training image (the calibration)
    threshold: float

    @property
    def near_copy(self) -> np.ndarray:
        return self.neighbours.distance <= self.threshold

    @property
    def relative(self) -> np.ndarray:
        """Sample distances divided by the median train-to-train distance (1: typical, 0: a copy)."""
        return self.neighbours.distance / max(float(np.median(self.train_nn)), 1e-12)


def match_space(space: str, samples, train, train_flipped, *, quantile: float, ratio: float,
                max_train_queries: int, seed: int) -> SpaceMatch:
    """Nearest training image of each sample plus the calibrated threshold, in one vector space."""
    train_nn = train_nearest(train, train_flipped, max_queries=max_train_queries, seed=seed)
    return SpaceMatch(space, nearest_neighbours(samples, train, train_flipped), train_nn,
                      copy_threshold(train_nn, quantile, ratio))


@dataclass(frozen=True)
class MemorizationReport:
    """Per-space matches, the near-copy flags (a copy in any space counts) and their share."""

    spaces: dict  # {"pixel": SpaceMatch, "feature": SpaceMatch (when features were given)}
    quantile: float
    ratio: float

    @property
    def near_copy(self) -> np.ndarray:
        return np.any([m.near_copy for m in self.spaces.values()], axis=0)

    @property
    def share(self) -> float:
        return float(np.mean(self.near_copy))

    def rows(self) -> list[dict]:
        """One dict per sample: the near-copy flag and, per space, train index, distance, flip, relative."""
        rows = [{"sample": i, "near_copy": bool(c)} for i, c in enumerate(self.near_copy)]
        for name, m in self.spaces.items():
            nb, rel = m.neighbours, m.relative
            for i, row in enumerate(rows):
                row.update({f"{name}_train_index": int(nb.index[i]), f"{name}_distance": float(nb.distance[i]),
                            f"{name}_flipped": bool(nb.flipped[i]), f"{name}_relative": float(rel[i])})
        return rows

    def summary(self) -> dict:
        """Flat scalars: near-copy share overall and per space, thresholds, distance percentiles."""
        out = {"near_copy_share": self.share}
        for name, m in self.spaces.items():
            out[f"{name}_near_copy_share"] = float(np.mean(m.near_copy))
            out[f"{name}_threshold"] = m.threshold
            for p in PERCENTILES:
                out[f"{name}_sample_to_train_p{p}"] = float(np.percentile(m.neighbours.distance, p))
                out[f"{name}_train_to_train_p{p}"] = float(np.percentile(m.train_nn, p))
        return out

    def closest(self, k: int) -> list[tuple[int, str]]:
        """(sample index, space) of the k samples closest to a training image, by relative distance."""
        names = list(self.spaces)
        relative = np.stack([self.spaces[s].relative for s in names])  # (spaces, N)
        best_space = np.argmin(relative, axis=0)
        order = np.argsort(relative.min(axis=0), kind="stable")[:k]
        return [(int(i), names[best_space[i]]) for i in order]


def memorization_report(samples, train, sample_feats=None, train_feats=None, train_flipped_feats=None, *,
                        quantile: float = 0.05, ratio: float = 0.5, max_train_queries: int = 1000,
                        seed: int = 0) -> MemorizationReport:
    """Match uint8 samples (N, H, W, C) to training images (M, H, W, C) in pixels, and in features if given.

    Feature space needs the features of the samples, of the training images and of their mirrors.
    """
    samples, train = np.asarray(samples), np.asarray(train)
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1:]} but training images {train.shape[1:]}: "
                         "expected the same (H, W, C)")
    kwargs = dict(quantile=quantile, ratio=ratio, max_train_queries=max_train_queries, seed=seed)
    spaces = {"pixel": match_space("pixel", pixel_vectors(samples), pixel_vectors(train),
                                   pixel_vectors(flip_images(train)), **kwargs)}
    if sample_feats is not None:
        if train_feats is None or train_flipped_feats is None:
            raise ValueError("feature space needs train_feats and train_flipped_feats too")
        spaces["feature"] = match_space("feature", feature_vectors(sample_feats), feature_vectors(train_feats),
                                        feature_vectors(train_flipped_feats), **kwargs)
    return MemorizationReport(spaces, quantile, ratio)


def save_pairs_png(path: Path, samples, train, report: MemorizationReport, k: int = 16,
                   pairs_per_row: int = 4) -> Path:
    """A grid of the k samples closest to a training image, each beside its match (mirrored if it was).

    Each pair is a 2-image strip (1 px padding); the strips form a grid with 4 px gaps, closest first.
    """
    if k < 1 or not len(report.near_copy):
        raise ValueError(f"save_pairs_png: k = {k} pairs of {len(report.near_copy)} samples: expected at least 1")
    samples, train = np.asarray(samples), np.asarray(train)
    pairs, notes = [], []
    for i, space in report.closest(k):
        nb = report.spaces[space].neighbours
        match = train[nb.index[i]][:, ::-1] if nb.flipped[i] else train[nb.index[i]]
        pairs.append(make_grid(np.stack([samples[i], match]), pad=1, cols=2))
        notes.append(f"{i}:{int(nb.index[i])}{'f' if nb.flipped[i] else ''}:{space}:{nb.distance[i]:.4g}")
    grid = make_grid(np.stack(pairs), pad=4, cols=min(pairs_per_row, len(pairs)))
    return save_png(Path(path), grid, {"ddpm_tf:pairs": " ".join(notes),
                                       "ddpm_tf:pairs_format": "sample:train[f=mirrored]:space:distance"})
