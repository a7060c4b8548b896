"""Pixels in and out: [-1, 1] floats <-> uint8, near-square grids, atomic PNG writing with text metadata."""

from __future__ import annotations

import errno
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(x) -> np.ndarray:
    """Images in [-1, 1] (any float array) -> uint8 in [0, 255], rounded."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(x) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]."""
    return np.asarray(x, dtype=np.float32) / 127.5 - 1.0


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the most square grid holding n images: 64 -> 8x8, 10 -> 3x4."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def make_grid(images: np.ndarray, pad: int = 2, background: int = 255, cols: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 grid, near-square by default."""
    n, h, w, c = images.shape
    rows, cols = grid_shape(n) if cols is None else (-(-n // cols), cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write to a temporary file beside `path`, flush to disk, then move it into place whole (atomic on POSIX
    and Windows). With `overwrite=False` an existing `path` is never replaced: FileExistsError instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path, data)
    finally:
        if tmp.exists():
            tmp.unlink()


def _link_exclusive(tmp: Path, path: Path, data: bytes) -> None:
    """Publish `tmp` as `path` unless `path` exists: a hard link fails on an existing name, atomically."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
    except OSError:  # no hard links on this file system (FAT, some shares): exclusive create, then write
        with open(path, "xb") as f:
            f.write(data)


def png_bytes(image: np.ndarray, metadata: dict | None = None) -> bytes:
    """Encode one (H, W, C) uint8 image (C = 1 or 3) as PNG, with `metadata` as tEXt chunks."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: Path, image: np.ndarray, metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write one uint8 image as a PNG atomically (never over an existing file unless `overwrite`); returns the path."""
    atomic_write_bytes(Path(path), png_bytes(image, metadata), overwrite)
    return Path(path)


def read_png_metadata(path: Path) -> dict:
    """The tEXt metadata of a PNG as a dict of strings."""
    with Image.open(path) as im:
        return dict(im.text)
