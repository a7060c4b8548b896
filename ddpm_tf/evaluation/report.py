"""Evaluation: feature networks (Inception-V3 or a user's Keras model), KID/FID and memorisation, reports.

The maths lives in `metrics.py` (FID, KID) and `memorization.py` (nearest neighbours); this module
turns uint8 images into features with TensorFlow and writes eval.csv rows and TensorBoard scalars.
Typical use (what `ddpm eval` and the training callback do):

    extractor = load_features(None)                      # or a path given with --features
    reference = prepare_reference(train_uint8, extractor)  # once per run: training features
    result = evaluate_images(samples_uint8, reference, extractor, memorization=True)
    append_csv_row(run.eval_csv, {"step": step, **result.row()})
"""

from __future__ import annotations

import contextlib
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..compat import keras, tf
from ..errors import EvalError
from ..runs import write_csv
from ..summaries import image_summary, scalar_summary
from .memorization import MemorizationReport, flip_images, memorization_report
from .metrics import fid, kid

# The file Keras downloads for InceptionV3(include_top=False, weights="imagenet").
INCEPTION_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
INCEPTION_NOTOP_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                       + INCEPTION_NOTOP_FILE)
INCEPTION_SIZE = 299
EXPECTED_FILES = (f"Keras' Inception-V3 no-top weights ({INCEPTION_NOTOP_FILE}) or a whole saved Keras model "
                  "(.keras, or .h5 saved with model.save) mapping images in [-1, 1] to feature vectors")


class FeatureExtractor(Protocol):
    """uint8 images (N, H, W, C), C 1 or 3 -> (N, D) float features; `name` says which network."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@contextlib.contextmanager
def _float32_policy():
    """Build feature networks in float32 even when a run's mixed precision policy is active."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


class KerasFeatures:
    """A Keras model as a FeatureExtractor: channels matched, resized (bilinear), preprocessed, batched."""

    def __init__(self, model, name: str, *, preprocess=None, batch_size: int = 32):
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 4 or shape[-1] not in (1, 3):
            raise EvalError(f"{name}: the model takes inputs of shape {shape}: expected (batch, H, W, 1 or 3)")
        self.model, self.name, self.batch_size = model, name, batch_size
        self.size = shape[1:3] if None not in shape[1:3] else None
        self.channels = shape[-1]
        # Default input convention: this project's [-1, 1] (Inception's preprocess_input maps to the same).
        self.preprocess = preprocess or (lambda x: x / 127.5 - 1.0)
        self._forward = tf.function(self._features, reduce_retracing=True)

    def _features(self, x):
        # x: (B, H, W, model channels) float32 in [0, 255]
        if self.size is not None:
            # antialias only matters when shrinking, where plain bilinear would alias (Parmar et al. 2022).
            x = tf.image.resize(x, self.size, method="bilinear", antialias=True)
        y = self.model(self.preprocess(x), training=False)
        return tf.reshape(tf.cast(y, tf.float32), [tf.shape(y)[0], -1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise EvalError(f"expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        if not len(images):
            raise EvalError("no images to compute features of")
        out = [self._forward(tf.constant(self._match_channels(images[lo:lo + self.batch_size]))).numpy()
               for lo in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float64)

    def _match_channels(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, C) -> float32 with the model's channel count (gray tiled, RGB to luma)."""
        # Done here, not in the traced function: a retrace generalises the channel axis to None.
        x = images.astype(np.float32)
        if x.shape[-1] == 1 and self.channels == 3:
            return np.repeat(x, 3, axis=-1)
        if x.shape[-1] == 3 and self.channels == 1:
            return x @ np.array([[0.2989], [0.5870], [0.1140]], np.float32)  # tf.image.rgb_to_grayscale's
        return x


def _inception(weights):
    """Keras' Inception-V3 up to the 2048-d average pool (tests replace this to stay offline)."""
    with _float32_policy():
        return keras.applications.InceptionV3(include_top=False, pooling="avg", weights=weights,
                                              input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3))


def inception_features(weights="imagenet", *, batch_size: int = 32) -> KerasFeatures:
    """Inception-V3 pool features (2048-d, images resized to 299): "imagenet" (downloaded), a file, or None."""
    try:
        model = _inception(str(weights) if isinstance(weights, Path) else weights)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a failed download or a wrong file
        if weights == "imagenet":
            raise EvalError(
                f"could not get Keras' ImageNet Inception-V3 weights ({type(exc).__name__}: {exc}). Without "
                f"internet, fetch {INCEPTION_NOTOP_URL} elsewhere and pass its path with --features PATH "
                f"(or put it in ~/.keras/models/{INCEPTION_NOTOP_FILE})") from None
        raise EvalError(f"{weights}: not Inception-V3 no-top weights ({type(exc).__name__}: {exc}); expected "
                        f"Keras' {INCEPTION_NOTOP_FILE}") from None
    if weights is None or weights == "imagenet":
        name = "inception-random" if weights is None else "inception-imagenet"
    else:
        name = f"inception:{Path(weights).name}"
    return KerasFeatures(model, name, preprocess=keras.applications.inception_v3.preprocess_input,
                         batch_size=batch_size)


def _hdf5_kind(path: Path) -> str | None:
    """"model" (whole model), "weights" (weights only) or None (not HDF5)."""
    import h5py  # a dependency of TensorFlow and of Keras on both lines

    if not h5py.is_hdf5(path):
        return None
    with h5py.File(path, "r") as f:
        return "model" if "model_config" in f.attrs else "weights"


def _load_model(path: Path):
    try:
        with _float32_policy():
            return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001 - load_model raises many types for unreadable files
        hint = " (TF 2.10's Keras cannot read .keras files: save it as .h5)" if zipfile.is_zipfile(path) else ""
        raise EvalError(f"{path}: cannot load this Keras model{hint} ({type(exc).__name__}: {exc})") from None


def load_features(spec=None, *, batch_size: int = 32) -> KerasFeatures:
    """The extractor `--features` names: None or "imagenet" (default), Inception weights, or a whole model."""
    if spec is None or spec == "imagenet":
        return inception_features("imagenet", batch_size=batch_size)
    path = Path(spec)
    if path.is_dir():
        raise EvalError(f"{path}: a folder, not a file (--features expects {EXPECTED_FILES})")
    if not path.is_file():
        raise EvalError(f"{path}: no such file (--features expects {EXPECTED_FILES})")
    kind = "model" if zipfile.is_zipfile(path) else _hdf5_kind(path)
    if kind == "weights":
        return inception_features(path, batch_size=batch_size)
    if kind is None:
        raise EvalError(f"{path}: neither an HDF5 (.h5) nor a .keras file (--features expects {EXPECTED_FILES})")
    return KerasFeatures(_load_model(path), f"model:{path.name}", batch_size=batch_size)


def load_image_folder(path: Path, size: int, channels: int, warn=None) -> np.ndarray:
    """Every usable image under a folder as (N, size, size, channels) uint8 (centre-cropped, resized)."""
    from ..data.decode import DecodeSettings, decode_file
    from ..data.prepare import scan

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    if not Path(path).is_dir():
        raise EvalError(f"{path}: not a folder (expected a folder of images to evaluate)")
    settings = DecodeSettings(size, channels)
    images, records = [], scan(Path(path))
    for record in records:
        result = decode_file(record.full, settings) if record.reason is None else None
        if result is not None and result.reason is None:
            images.append(result.pixels)
        elif result is not None:
            warn(f"skipping {record.full}: {result.reason} {result.detail}".rstrip())
    if not images:
        raise EvalError(f"{path}: no readable image among {len(records)} files")
    return np.stack(images)


@dataclass(frozen=True)
class Reference:
    """The training images and their features, computed once and reused by every evaluation."""

    images: np.ndarray  # (M, H, W, C) uint8
    features: np.ndarray  # (M, D)
    features_flipped: np.ndarray | None  # (M, D) of the mirrored images (memorisation only)


def prepare_reference(train: np.ndarray, extractor: FeatureExtractor, *, flipped: bool = True) -> Reference:
    """Featurise the training images (and their mirrors, for the memorisation report) once."""
    train = np.asarray(train)
    return Reference(train, extractor(train), extractor(flip_images(train)) if flipped else None)


@dataclass(frozen=True)
class EvalResult:
    """KID (mean, std over subsets), FID, sizes, the feature network's name and the memorisation report."""

    n: int
    n_train: int
    features: str
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    kid_subsets: int
    fid: float
    memorization: MemorizationReport | None = None

    def scalars(self) -> dict:
        """The numbers worth plotting: KID, FID and (with memorisation) the near-copy shares."""
        out = {"kid_mean": self.kid_mean, "kid_std": self.kid_std, "fid": self.fid}
        if self.memorization is not None:
            out.update({k: v for k, v in self.memorization.summary().items() if k.endswith("near_copy_share")})
        return out

    def row(self) -> dict:
        """One eval.csv row: time, sizes, feature network, KID settings and every summary number."""
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "n": self.n, "n_train": self.n_train,
               "features": self.features, "kid_subsets": self.kid_subsets, "kid_subset_size": self.kid_subset_size,
               "kid_mean": self.kid_mean, "kid_std": self.kid_std, "fid": self.fid}
        if self.memorization is not None:
            row.update(self.memorization.summary())
        return row


def evaluate_images(samples: np.ndarray, reference: Reference, extractor: FeatureExtractor, *,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                    memorization: bool = False, copy_quantile: float = 0.05,
                    copy_ratio: float = 0.5, sample_features=None) -> EvalResult:
    """KID and FID of uint8 samples against the reference, plus the memorisation report if asked
    (`sample_features`: the samples' features when the caller has them already)."""
    samples = np.asarray(samples)
    feats = extractor(samples) if sample_features is None else sample_features
    kid_mean, kid_std = kid(feats, reference.features, subsets=kid_subsets, subset_size=kid_subset_size,
                            seed=seed)
    report = None
    if memorization:
        flipped = reference.features_flipped
        if flipped is None:
            flipped = extractor(flip_images(reference.images))
        report = memorization_report(samples, reference.images, feats, reference.features, flipped,
                                     quantile=copy_quantile, ratio=copy_ratio, seed=seed)
    return EvalResult(len(samples), len(reference.images), extractor.name, kid_mean, kid_std,
                      min(kid_subset_size, len(samples), len(reference.images)), kid_subsets,
                      fid(feats, reference.features), report)


def save_memorization_csv(path: Path, report: MemorizationReport) -> None:
    """One row per sample: near-copy flag and, per space, the nearest training image and its distance."""
    rows = report.rows()
    write_csv(Path(path), list(rows[0]) if rows else ["sample"], rows)


def write_tensorboard(writer, result: EvalResult, step: int, pairs_png: Path | None = None,
                      prefix: str = "eval/") -> None:
    """KID, FID and near-copy shares as TensorBoard scalars (and the closest pairs as an image)."""
    with writer.as_default():
        for key, value in result.scalars().items():
            scalar_summary(prefix + key, value, step)
        if pairs_png is not None:
            from PIL import Image

            with Image.open(pairs_png) as im:
                image_summary(prefix + "closest_pairs", np.asarray(im), Path(pairs_png).read_bytes(), step)
    writer.flush()
