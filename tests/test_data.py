"""Decoding one real-world file, and the tf.data pipeline over the prepared cache (in memory or memory-mapped)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddpm_tf.config import DataConfig
from ddpm_tf.data.cache import ShardedImages
from ddpm_tf.data.decode import load_image, to_mode
from ddpm_tf.data.pipeline import make_dataset
from ddpm_tf.data.prepare import prepare
from ddpm_tf.errors import DataError


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


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, 77), ("I;16", 65535, 255), ("I", 1000, round(1000 / 65535 * 255)), ("F", 0.5, 128), ("F", 300.0, 1),
    ("1", 1, 255),
])
def test_modes_to_8_bit(mode, value, expected):
    im = Image.new(mode, (4, 4), value)
    assert np.asarray(to_mode(im, 1)).ravel().tolist() == [expected] * 16


def test_jpeg_draft_mode_stays_close_to_a_full_decode(tmp_path):
    yy, xx = np.mgrid[0:512, 0:512]
    arr = np.stack([xx // 2, yy // 2, (xx + yy) // 4], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=95)
    from ddpm_tf.data.decode import DecodeSettings, decode_file

    fast = decode_file(path, DecodeSettings(32, 3, draft=True)).pixels.astype(int)
    full = decode_file(path, DecodeSettings(32, 3, draft=False)).pixels.astype(int)
    assert np.abs(fast - full).mean() < 2


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        prepare(DataConfig(dir=str(tmp_path / "missing"), cache=str(tmp_path / "c")), echo=lambda s: None)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no usable image"):
        prepare(DataConfig(dir=str(tmp_path / "e"), cache=str(tmp_path / "c")), echo=lambda s: None)


def _batches(ds, steps):
    return [b.numpy() for b in ds.take(steps)]


def test_memory_mapped_shards_give_the_same_batches(tmp_path, monkeypatch):
    from ddpm_tf.data import cache

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    per = 5  # several shards, the last one short
    paths = []
    for k, start in enumerate(range(0, len(images), per)):
        paths.append(tmp_path / f"s{k}.npy")
        np.save(paths[-1], images[start:start + per])
    mapped = ShardedImages(paths, per, len(images), images.shape[1:])
    assert np.array_equal(mapped.take([22, 0, 7, 7]), images[[22, 0, 7, 7]])
    for start_epoch, skip in ((0, 0), (2, 3)):
        a = _batches(make_dataset(images, 4, seed=3, start_epoch=start_epoch, skip_images=4 * skip), 14)
        b = _batches(make_dataset(mapped, 4, seed=3, start_epoch=start_epoch, skip_images=4 * skip), 14)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 14

    # The prepared cache chooses: in memory up to data.memory_mb, memory-mapped shards above it.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((40, 40)).save(src / f"{i}.png")
    monkeypatch.setattr(cache, "SHARD_BYTES", 2 * 16 * 16 * 3)  # 2 images per shard
    prepared = prepare(DataConfig(dir=str(src), image_size=16, cache=str(tmp_path / "c"), workers=1,
                                  near_duplicate_threshold=-1), echo=lambda s: None)
    in_memory, on_disk = prepared.images(memory_mb=1), prepared.images(memory_mb=0)
    assert isinstance(in_memory, np.ndarray) and isinstance(on_disk, ShardedImages)
    assert len(list((tmp_path / "c").glob("images-*.npy"))) == 3
    a = _batches(make_dataset(in_memory, 4, seed=1), 6)
    b = _batches(make_dataset(on_disk, 4, seed=1), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
