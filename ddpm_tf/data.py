"""A folder of images -> checked, centre-cropped uint8 arrays -> a tf.data pipeline.

Source files are only ever opened for reading.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm", ".pbm"}


class DataError(ValueError):
    """The data folder cannot be used at all (missing, or no usable image)."""


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, extensions case-insensitive, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.dir: {root} is not a folder (expected a folder of images)")
    files = []
    for path in sorted(root.rglob("*")):  # rglob does not descend into symlinked folders: no loops
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append(path)
        except OSError:  # a broken or looping symlink is not an image file
            continue
    return files


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to RGB (channels 3) or L (channels 1); transparency goes on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or im.mode == "LA" or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB" if channels == 3 else "L")


def load_image(path: Path, size: int, channels: int, min_side: int = 1) -> np.ndarray:
    """Decode one file: EXIF orientation, colour mode, centre square crop, Lanczos resize -> (S, S, C) uint8."""
    with Image.open(path) as im:
        im.seek(0)  # animated files: first frame
        im.load()
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        if min(w, h) < min_side:
            raise ValueError(f"too small ({w}x{h}, data.min_side is {min_side})")
        im = _to_mode(im, channels)
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.LANCZOS)
        arr = np.asarray(im, dtype=np.uint8)
    return arr.reshape(size, size, channels)


def load_folder(data_cfg, warn=None) -> tuple[np.ndarray, list[Skipped]]:
    """All usable images under `data_cfg.dir` as (N, S, S, C) uint8, and the files skipped with reasons."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    files = find_images(Path(data_cfg.dir))
    images, skipped = [], []
    for path in files:
        try:
            images.append(load_image(path, data_cfg.image_size, data_cfg.channels, data_cfg.min_side))
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            skipped.append(Skipped(path, f"not a readable image ({type(exc).__name__})"))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            skipped.append(Skipped(path, str(exc) or type(exc).__name__))
        else:
            continue
        warn(f"skipping {path}: {skipped[-1].reason}")
    if not images:
        raise DataError(f"data.dir: no usable image under {data_cfg.dir} ({len(files)} candidate files, "
                        f"{len(skipped)} skipped; extensions searched: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(images), skipped


def make_dataset(images: np.ndarray, batch_size: int, seed: int, start_epoch: int = 0, flip: bool = True,
                 skip: int = 0):
    """Infinite tf.data pipeline of float32 batches in [-1, 1], one epoch after another.

    Each epoch is a fresh permutation of all images (shuffled before batching, so every image is seen
    every epoch) drawn from the stateless seed (seed, epoch), and each image's flip from
    (seed, epoch, index): the data order is a pure function of (seed, epoch), so a resumed run
    continues it exactly; `skip` drops the first batches of `start_epoch` (a resume mid-epoch).
    """
    from .compat import tf

    n = len(images)
    table = tf.constant(images)  # (N, S, S, C) uint8

    def epoch_batches(epoch):
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([seed, tf.cast(epoch, tf.int32)])))

        def load(index):
            x = tf.gather(table, index)
            if flip:
                flip_seed = tf.stack([seed + 1, tf.cast(epoch, tf.int32) * n + index])
                x = tf.image.stateless_random_flip_left_right(x, flip_seed)
            return tf.cast(x, tf.float32) / 127.5 - 1.0

        return tf.data.Dataset.from_tensor_slices(order).map(load).batch(batch_size)

    ds = tf.data.Dataset.range(start_epoch, 2**31 - 1).flat_map(epoch_batches).skip(skip)
    return ds.prefetch(tf.data.AUTOTUNE)
