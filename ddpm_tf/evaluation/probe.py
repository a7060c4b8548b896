"""The class-accuracy probe of `ddpm eval --per-class`: a linear classifier on the feature network's embeddings
of the labelled training images, in numpy (ridge regression onto the multi-hot labels, closed form).

A sample asked for class c "lands" when the probe's highest score is c; a sample asked for tags T scores the
share of T the probe finds (score above 0.5). The probe's own accuracy on real training images it did not
see (a stratified 20 % held out, then refitted on everything) is reported beside it: a figure of 0.9 for the
samples means little when the probe gets only 0.6 of real images right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EvalError

HELD_OUT = 0.2  # share of each class's images the probe does not see when its own accuracy is measured
RIDGE = 0.1  # the ridge penalty, relative to the mean variance of a standardised feature (1): scale-free
TAG_PRESENT = 0.5  # a tag score above this says the tag is there


@dataclass(frozen=True)
class Probe:
    """Standardise, then one linear score per label: (N, D) features -> (N, K) scores."""

    kind: str  # "class" (one label per image: argmax) or "tags" (several: each score against TAG_PRESENT)
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weights: np.ndarray  # (D + 1, K), the last row the bias
    held_out_accuracy: float  # on real images it was not fitted on (nan when too few images to hold any out)
    n_fit: int  # labelled images it was (re)fitted on

    def scores(self, features) -> np.ndarray:
        """(N, K) label scores of (N, D) features."""
        return _design(features, self.mean, self.scale) @ self.weights

    def hits(self, features, asked) -> np.ndarray:
        """(N,) per sample, the share of its asked labels (multi-hot (N, K)) that the probe finds."""
        scores, asked = self.scores(features), np.asarray(asked) > 0
        if self.kind == "class":
            return (asked[np.arange(len(scores)), np.argmax(scores, axis=1)]).astype(np.float64)
        found = (scores > TAG_PRESENT) & asked
        return found.sum(axis=1) / np.maximum(asked.sum(axis=1), 1)

    def accuracy(self, features, asked) -> float:
        """The mean of `hits`: the share of samples that land in the class asked for (tags: of tags found)."""
        return float(np.mean(self.hits(features, asked)))


def _design(features, mean, scale) -> np.ndarray:
    """Standardised features with a column of ones (the bias)."""
    x = (np.asarray(features, np.float64) - mean) / scale
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """argmin_W |xW - y|^2 + penalty |W|^2, in the primal (D <= N) or the dual form (D > N): the same W."""
    n, d = x.shape
    if d <= n:
        return np.linalg.solve(x.T @ x + penalty * np.eye(d), x.T @ y)
    return x.T @ np.linalg.solve(x @ x.T + penalty * np.eye(n), y)


def _fit(features, matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature stays zero instead of dividing by 0
    x = _design(features, mean, scale)
    return mean, scale, ridge(x, np.asarray(matrix, np.float64), RIDGE * len(x))


def held_out_split(matrix, kind: str, seed: int = 0) -> np.ndarray:
    """A boolean mask of the rows held out: HELD_OUT of each class (at least one of a class with 2 or more
    images, none of a class of one), or of all rows for tags; seeded, the same on every machine."""
    matrix = np.asarray(matrix)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(matrix), bool)
    groups = [np.flatnonzero(matrix[:, k]) for k in range(matrix.shape[1])] if kind == "class" \
        else [np.arange(len(matrix))]
    for rows in groups:
        if len(rows) >= 2:
            take = min(len(rows) - 1, max(1, int(round(HELD_OUT * len(rows)))))
            mask[rng.choice(rows, take, replace=False)] = True
    return mask


def fit_labels_probe(features, labels, seed: int = 0) -> Probe:
    """The probe of a training set's Labels (data/labels.py): classes for data.labels: folders, else tags."""
    return fit_probe(features, labels.matrix, "class" if labels.label_set.mode == "folders" else "tags", seed)


def fit_probe(features, matrix, kind: str, seed: int = 0) -> Probe:
    """The probe of (N, D) features of labelled images with multi-hot labels (N, K); unlabelled rows are left
    out. Its held-out accuracy is measured on a split, then it is refitted on every labelled image."""
    features, matrix = np.asarray(features), np.asarray(matrix)
    labelled = matrix.any(axis=1)
    features, matrix = features[labelled], matrix[labelled]
    if len(features) < 2:
        raise EvalError(f"the class-accuracy probe needs at least 2 labelled training images, found {len(features)}")
    held = held_out_split(matrix, kind, seed)
    accuracy = float("nan")
    if held.any() and (~held).any():
        part = Probe(kind, *_fit(features[~held], matrix[~held]), float("nan"), int((~held).sum()))
        accuracy = part.accuracy(features[held], matrix[held])
    return Probe(kind, *_fit(features, matrix), accuracy, len(features))
