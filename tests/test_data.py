"""Decoding a real-world folder: odd modes, EXIF rotation, non-ASCII names, bad files skipped, sources untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from ddpm_tf.config import DataConfig
from ddpm_tf.data import DataError, find_images, load_folder, load_image


def tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode("utf-8"))
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "src"
    (root / "人像" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "人像" / "红色.JPG")
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(root / "transparent.png")  # fully transparent -> white
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(root / "deeper16.png")  # 16-bit white
    Image.new("P", (20, 20), 3).save(root / "人像" / "deeper" / "palette.gif")
    (root / "notes.jpg").write_text("this is not an image", encoding="utf-8")
    (root / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(root / "tiny.png")
    (root / "readme.txt").write_text("ignored: not an image extension", encoding="utf-8")
    return root


def test_messy_folder(messy):
    before = tree_hash(messy)
    warnings = []
    images, skipped = load_folder(DataConfig(dir=str(messy), image_size=16, channels=3, min_side=10),
                                  warn=warnings.append)
    assert tree_hash(messy) == before  # sources are only read
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"notes.jpg", "empty.png", "tiny.png"}
    assert "too small" in reasons["tiny.png"]
    assert any("notes.jpg" in w for w in warnings)
    names = [p.name for p in find_images(messy)]
    assert "红色.JPG" in names and "readme.txt" not in names
    by_name = dict(zip([p.name for p in find_images(messy) if p.name not in reasons], images))
    assert np.abs(by_name["红色.JPG"].astype(int) - [255, 0, 0]).max() <= 3  # JPEG is lossy
    assert (by_name["transparent.png"] == 255).all()
    assert (by_name["deeper16.png"] == 255).all()


def test_exif_rotation_and_centre_crop(tmp_path):
    # A 40x20 image whose left half is black, stored with EXIF orientation 6 (rotate 90 degrees clockwise):
    # displayed, it is 20x40 with the black half on top; the centre crop keeps rows 10..30.
    arr = np.full((20, 40, 3), 255, np.uint8)
    arr[:, :20] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=100)
    out = load_image(path, 20, 3)
    assert out[:8].mean() < 30 and out[-8:].mean() > 225


def test_grayscale_channels(tmp_path):
    path = tmp_path / "c.png"
    Image.new("RGB", (10, 10), (255, 255, 255)).save(path)
    assert load_image(path, 8, 1).shape == (8, 8, 1)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_folder(DataConfig(dir=str(tmp_path / "missing")))
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no usable image"):
        load_folder(DataConfig(dir=str(tmp_path / "e")))
