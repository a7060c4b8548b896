"""One image file -> a checked, cropped (S, S, C) uint8 array; the prepared cache -> a tf.data pipeline.

Source files are only ever opened for reading. TensorFlow is imported inside `make_dataset` only, so
`ddpm prepare` and its decoding processes never load it. Scanning a folder, hashing, duplicates and the
cache on disk live in `prepare.py` and `cache.py`; the tf.data pipeline in `pipeline.py`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

# How an image becomes a square: centre square, centred on the largest face (the face extra), or padded.
CROPS = ("center", "face", "none")
CHANNELS = (1, 3)  # grayscale or RGB
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pnm", ".pbm"}

# Why a file is not used. Decoding decides these seven (the scan may find the last two first), prepare.py and
# labels.py (caption) the rest.
NOT_AN_IMAGE = "not-an-image"
EMPTY = "empty"
CORRUPT = "truncated-or-corrupt"
TOO_SMALL = "too-small"
BOMB = "decompression-bomb"
UNREADABLE = "unreadable"
NOT_A_FILE = "not-a-regular-file"


class NotRegularFile(OSError):
    """A path that was a regular file when scanned is now a pipe, device or folder."""


def shown(text: str) -> str:
    """`text` as valid Unicode for JSON and the terminal: each byte of a file name that is not UTF-8 (which
    Python holds as a lone surrogate, U+DC80..U+DCFF) becomes `\\xNN`, any other lone surrogate `\\uNNNN`."""
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def _nonblocking(path, flags):
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path):
    """Open a file for binary reading, refusing (NotRegularFile) anything but a regular file: a pipe swapped
    in after the scan would otherwise block the open forever."""
    f = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 - returned to the caller
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotRegularFile(f"{shown(os.fspath(path))} is not a regular file (a device, socket, pipe or folder)")
    except BaseException:
        f.close()
        raise
    return f


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that changes the decoded pixels: part of the cache key."""

    size: int
    channels: int
    crop: str = "center"  # one of CROPS
    background: tuple = (255, 255, 255)
    min_side: int = 1
    max_pixels: int = 100_000_000
    draft: bool = True  # JPEG DCT-domain downscaling for large reductions


@dataclass
class Decoded:
    """The outcome of decoding one file: pixels and perceptual hash, or the reason it is not used."""

    pixels: np.ndarray | None = None  # (S, S, C) uint8
    reason: str | None = None
    detail: str = ""
    phash: int = 0  # perceptual_hash
    face: str = ""  # face crops only: found | none | no-opencv


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """Pillow's decompression-bomb limit set to ours while opening (Pillow raises at twice the limit)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_file(path, settings: DecodeSettings) -> Decoded:
    """Decode one file into a Decoded, mapping every failure to a reason (never raises for a bad file)."""
    try:
        f = open_regular(path)  # opened here so that a permission error is told apart from bad content
    except NotRegularFile:
        return Decoded(reason=NOT_A_FILE, detail="a device, socket, pipe or folder")
    except OSError as exc:
        return Decoded(reason=UNREADABLE, detail=exc.strerror or type(exc).__name__)
    with f, _pixel_limit(settings.max_pixels):
        if f.seek(0, 2) == 0:
            return Decoded(reason=EMPTY, detail="zero bytes")
        f.seek(0)
        try:
            im = Image.open(f)
        except UnidentifiedImageError:
            return Decoded(reason=NOT_AN_IMAGE, detail="Pillow does not recognise the content")
        except Image.DecompressionBombError as exc:  # Pillow's own check, at twice our limit
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
            return Decoded(reason=BOMB, detail=f"{pixels}, more than data.max_pixels = {settings.max_pixels:,}")
        except Exception as exc:  # noqa: BLE001 - a broken header can raise anything; the file is at fault
            return Decoded(reason=CORRUPT, detail=f"{type(exc).__name__}: {exc}")
        with im:
            return _decode_open(im, settings)


def _decode_open(im: Image.Image, settings: DecodeSettings) -> Decoded:
    """Checks, then pixels, for an opened image."""
    w, h = im.size
    if w * h > settings.max_pixels:
        return Decoded(reason=BOMB, detail=f"{w}x{h} is more than data.max_pixels = {settings.max_pixels:,}")
    if min(w, h) < settings.min_side:
        return Decoded(reason=TOO_SMALL, detail=f"{w}x{h}, data.min_side is {settings.min_side}")
    try:
        im.seek(0)  # animated files: the first frame
        if settings.draft and im.format == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding; keep at least 2x the target for Lanczos.
            im.draft(None, (2 * settings.size, 2 * settings.size))
        im.load()
        im = ImageOps.exif_transpose(im)
        x, face = _crop_and_resize(im, settings)
    except Exception as exc:  # noqa: BLE001 - truncated data, bad chunks, odd modes: the file is at fault
        return Decoded(reason=CORRUPT, detail=f"{type(exc).__name__}: {exc}")
    return Decoded(pixels=x, phash=perceptual_hash(x), face=face)


def settings_from_config(data_cfg, draft: bool = True) -> DecodeSettings:
    """The decode settings of a config's data section (`draft` off only to measure what it saves)."""
    from PIL import ImageColor

    return DecodeSettings(size=data_cfg.image_size, channels=data_cfg.channels, crop=data_cfg.crop,
                          background=tuple(ImageColor.getrgb(data_cfg.background)[:3]), min_side=data_cfg.min_side,
                          max_pixels=data_cfg.max_pixels, draft=draft)


def decode_checked(path, data_cfg) -> np.ndarray:
    """One user file -> (S, S, C) uint8 with every guard of `ddpm prepare` (data.max_pixels read from the
    header before decoding, data.min_side, ...); DataError naming the file and prepare's reason otherwise."""
    out = decode_file(path, settings_from_config(data_cfg))
    if out.pixels is None:
        raise DataError(f"{shown(os.fspath(path))}: cannot use this image: {out.reason} ({shown(out.detail)})")
    return out.pixels


def load_image(path: Path, size: int, channels: int, min_side: int = 1, crop: str = "center",
               background: tuple = (255, 255, 255)) -> np.ndarray:
    """Decode one file -> (S, S, C) uint8, raising ValueError with the reason when it cannot be used."""
    out = decode_file(path, DecodeSettings(size, channels, crop, tuple(background), min_side))
    if out.pixels is None:
        raise ValueError(f"{out.reason}: {out.detail}")
    return out.pixels


def to_mode(im: Image.Image, channels: int, background: tuple = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB (channels 3) or L (channels 1); transparency composited on `background`.

    16-bit modes (I;16*) span 0..65535; I spans 0..255 unless a value exceeds 255 (then 0..65535); F spans
    0..1 unless a value exceeds 1 (then like I). CMYK uses Pillow's conversion (no ICC profile).
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max(initial=0.0))
        hi = 65535.0 if im.mode.startswith("I;16") or top > 255 else 255.0
        if im.mode == "F" and top <= 1.0:
            hi = 1.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        im = Image.alpha_composite(Image.new("RGBA", im.size, tuple(background) + (255,)), im)
    return im.convert("RGB" if channels == 3 else "L")


def _crop_and_resize(im: Image.Image, settings: DecodeSettings) -> tuple[np.ndarray, str]:
    """Colour mode, then the crop (center, face or pad) and a Lanczos resize -> ((S, S, C) uint8, face note)."""
    im = to_mode(im, settings.channels, settings.background)
    w, h = im.size
    face = ""
    if settings.crop == "none":
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(settings.background)).convert(im.mode)
        square.paste(im, ((side - w) // 2, (side - h) // 2))
        im, box = square, (0, 0, side, side)
    else:
        centre = None
        if settings.crop == "face":
            centre, face = find_face(im)
        box = square_box(w, h, centre)
    size = settings.size
    if box[2] - box[0] == size:
        im = im.crop(box)
    else:
        im = im.resize((size, size), Image.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8).reshape(size, size, settings.channels), face


def square_box(w: int, h: int, centre: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """The largest square inside a w x h image, centred on `centre` (default: the middle) but kept inside."""
    side = min(w, h)
    cx, cy = centre if centre is not None else (w / 2, h / 2)
    left = math.floor(min(max(cx - side / 2, 0), w - side))
    top = math.floor(min(max(cy - side / 2, 0), h - side))
    return left, top, left + side, top + side


@functools.lru_cache(maxsize=1)
def _face_detector():
    """OpenCV's bundled frontal-face Haar cascade, loaded once per process; None without OpenCV."""
    try:
        import cv2
    except ImportError:
        return None
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out of the main package
        return None
    return cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))


def find_face(im: Image.Image) -> tuple[tuple[float, float] | None, str]:
    """Centre of the largest face in `im` and 'found', or (None, 'none' | 'no-opencv')."""
    detector = _face_detector()
    if detector is None:
        return None, "no-opencv"
    gray = im.convert("L")
    scale = min(1.0, 512 / max(gray.size))  # detection on at most 512 px: faces in training crops are big
    if scale < 1.0:
        gray = gray.resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.BILINEAR)
    faces = detector.detectMultiScale(np.asarray(gray), scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None, "none"
    x, y, fw, fh = max((tuple(int(v) for v in f) for f in faces), key=lambda f: f[2] * f[3])
    return ((x + fw / 2) / scale, (y + fh / 2) / scale), "found"


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II basis: row k is cos(pi (2i + 1) k / 2n), scaled."""
    k, i = np.mgrid[0:n, 0:n]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(x: np.ndarray) -> int:
    """64-bit pHash (Zauner 2010, as in the imagehash package): which of the 8x8 lowest DCT frequencies of a
    32x32 grey thumbnail are above their median. Unlike dHash it tells a smooth ramp from a flat image."""
    gray = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).convert("L").resize((32, 32), Image.BOX)
    freq = (_DCT32 @ np.asarray(gray, np.float64) @ _DCT32.T)[:8, :8]
    bits = (freq > np.median(freq)).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))
