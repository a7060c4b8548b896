"""`ddpm prepare` on a generated messy folder: one file per case, each with its expected status and reason."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_tf import data, prepare
from ddpm_tf.cache import INDEX, MANIFEST
from ddpm_tf.cli import main
from ddpm_tf.config import DataConfig

SIZE = 16


def pattern(seed: int, size=(48, 40)) -> np.ndarray:
    """Random 4x4 colour blocks scaled up: structured (a stable perceptual hash), different per seed."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(blocks).resize(size, Image.NEAREST))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels: a decompression bomb's header, without the bomb."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def make_corpus(root: Path) -> dict[str, tuple[str, str | None]]:
    """Write the messy folder; returns {relative path: (status, reason)} as the manifest should say."""
    (root / "人像" / "深").mkdir(parents=True)
    (root / "sub").mkdir()
    expect = {}

    def save(rel, im, status="used", reason=None, **kw):
        im.save(root / rel, **kw)
        expect[rel] = (status, reason)

    save("a_pattern.png", Image.fromarray(pattern(1)))
    save("人像/照片.jpg", Image.fromarray(pattern(2)), quality=95)
    save("人像/深/webp.webp", Image.fromarray(pattern(3)))
    save("cmyk.jpg", Image.new("CMYK", (30, 30), (0, 255, 255, 0)))  # red
    save("rgba.png", Image.new("RGBA", (30, 30), (255, 0, 0, 128)))  # half-transparent red
    save("gray16.png", Image.fromarray(np.full((30, 30), 30000, np.uint16)))  # I;16
    save("int32.tif", Image.fromarray(np.full((30, 30), 200, np.int32)))  # mode I, 0..255
    save("float.tif", Image.fromarray(np.full((30, 30), 0.25, np.float32)))  # mode F, 0..1
    save("la.png", Image.new("LA", (30, 30), (20, 255)))
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 0, 160, 0] + [0] * 762)
    save("palette.png", palette, transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    halves = np.full((20, 40, 3), 255, np.uint8)
    halves[:, :20] = 0
    save("rotated.jpg", Image.fromarray(halves), exif=exif, quality=95)
    frames = [Image.new("RGB", (30, 30), c) for c in ((0, 0, 255), (0, 255, 0))]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    save("sub/copy.png", Image.fromarray(pattern(1)), "skipped", prepare.DUPLICATE)
    save("sub/near.jpg", Image.fromarray(pattern(1)), "skipped", prepare.NEAR_DUPLICATE, quality=80)
    save("tiny.png", Image.fromarray(pattern(4, (8, 8))), "skipped", data.TOO_SMALL)
    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = ("skipped", data.EMPTY)
    buf = root / "truncated.jpg"
    Image.fromarray(pattern(5, (64, 64))).save(buf, quality=95)
    buf.write_bytes(buf.read_bytes()[:400])
    expect["truncated.jpg"] = ("skipped", data.CORRUPT)
    (root / "page.png").write_text("<!doctype html><html><body>404</body></html>", encoding="utf-8")
    expect["page.png"] = ("skipped", data.NOT_AN_IMAGE)
    (root / "readme.txt").write_text("not an image", encoding="utf-8")
    expect["readme.txt"] = ("skipped", data.NOT_AN_IMAGE)
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    expect["bomb.png"] = ("skipped", data.BOMB)
    os.symlink("..", root / "sub" / "loop")  # a folder link to its own parent
    expect["sub/loop"] = ("skipped", prepare.SYMLINK_LOOP)
    os.symlink("self.jpg", root / "self.jpg")  # a link to itself
    expect["self.jpg"] = ("skipped", prepare.SYMLINK_LOOP)
    os.symlink("missing.png", root / "dangling.png")
    expect["dangling.png"] = ("skipped", prepare.BROKEN_LINK)
    return expect


def tree_hash(root: Path) -> str:
    """Names, types, link targets and bytes of everything under root (links are not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_size}|{st.st_mtime_ns}".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "messy"
    return src, make_corpus(src)


def cfg_for(src, out, **kw) -> DataConfig:
    return DataConfig(dir=str(src), image_size=SIZE, channels=3, min_side=10, cache=str(out), workers=1, **kw)


def manifest_of(out: Path) -> dict:
    return {row["path"]: row for row in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]}


def test_corpus_through_the_cli(corpus, tmp_path):
    src, expect = corpus
    before = tree_hash(src)
    out = tmp_path / "cache"
    result = CliRunner().invoke(main, ["prepare", str(src), "--size", str(SIZE), "--out", str(out),
                                       "--set", "data.min_side=10"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert tree_hash(src) == before  # nothing under SRC created, modified or deleted
    rows = manifest_of(out)
    assert {p: (r["status"], r["reason"]) for p, r in rows.items()} == expect
    used = sorted((r for r in rows.values() if r["status"] == "used"), key=lambda r: r["index"])
    assert [r["index"] for r in used] == list(range(len(used)))
    assert all(len(r["sha256"]) == 64 for r in used)
    assert rows["sub/copy.png"]["duplicate_of"] == "a_pattern.png"
    assert rows["sub/near.jpg"]["duplicate_of"] == "a_pattern.png"
    # The summary: a count per reason and the first files of each, on one screen.
    lines = result.output.splitlines()
    assert len(lines) < 25 and all(len(line) <= 110 for line in lines)
    assert any(line.split()[:2] == ["used", str(len(used))] for line in (s.strip() for s in lines))
    for reason in ("duplicate", "near-duplicate", "too-small", "not-an-image", "empty", "truncated-or-corrupt",
                   "decompression-bomb", "symlink-loop", "broken-link"):
        assert any(line.strip().startswith(reason + " ") for line in lines), reason
    # The cached arrays.
    images = prepare.Prepared(out, out / MANIFEST, [], prepare.settings_from_config(cfg_for(src, out))).images()
    assert images.shape == (len(used), SIZE, SIZE, 3) and images.dtype == np.uint8
    by_name = {r["path"]: images[r["index"]] for r in used}
    assert np.abs(by_name["cmyk.jpg"].astype(int) - [255, 0, 0]).max() <= 3
    assert np.abs(by_name["anim.gif"].astype(int) - [0, 0, 255]).max() <= 1  # the first frame
    assert (by_name["gray16.png"] == round(30000 / 65535 * 255)).all()
    assert (by_name["int32.tif"] == 200).all() and (by_name["float.tif"] == 64).all()
    assert (by_name["la.png"] == 20).all()
    rotated = by_name["rotated.jpg"].astype(int)
    assert rotated[:5].mean() < 30 and rotated[-5:].mean() > 225  # displayed upright: black half on top


def test_second_run_is_incremental(corpus, tmp_path):
    src, expect = corpus
    out = tmp_path / "cache"
    first = prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    distinct = len({r.sha256 for r in first.files if r.sha256})
    before = first.images()
    assert first.decoded == distinct and first.count == sum(s == "used" for s, _ in expect.values())
    index_mtime = (out / INDEX).stat().st_mtime_ns
    second = prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    assert second.decoded == 0 and second.reused == distinct
    assert (out / INDEX).stat().st_mtime_ns == index_mtime  # nothing rewritten
    assert [(r.path, r.reason, r.index) for r in second.files] == [(r.path, r.reason, r.index) for r in first.files]
    for i in range(3):
        Image.fromarray(pattern(100 + i)).save(src / f"new{i}.png")
    third = prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    assert third.decoded == 3 and third.count == first.count + 3
    after = third.images()
    old_index = {r.path: r.index for r in first.files if r.index is not None}
    for r in third.files:
        if r.path in old_index:
            assert np.array_equal(after[r.index], before[old_index[r.path]])


def test_parallel_decoding_equals_serial(tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(prepare.SERIAL_BELOW + 2):
        Image.fromarray(pattern(i)).save(src / f"{i:03d}.jpg", quality=90)
    serial = prepare.prepare(cfg_for(src, tmp_path / "s"), echo=lambda s: None).images()
    parallel_cfg = DataConfig(**{**cfg_for(src, tmp_path / "p").__dict__, "workers": 2})
    parallel = prepare.prepare(parallel_cfg, echo=lambda s: None)
    assert parallel.decoded == len(serial) and np.array_equal(parallel.images(), serial)


def test_damaged_or_foreign_cache_is_rebuilt(corpus, tmp_path):
    src, _ = corpus
    out = tmp_path / "cache"
    first = prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    shard = next(out.glob("images-*.npy"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    said = []
    again = prepare.prepare(cfg_for(src, out), echo=said.append)
    assert "damaged" in said[0] and "rebuilding" in said[0]
    assert again.decoded == first.decoded
    index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    index["version"] = 0
    (out / INDEX).write_text(json.dumps(index), encoding="utf-8")
    said.clear()
    assert prepare.prepare(cfg_for(src, out), echo=said.append).decoded == first.decoded
    assert "another version" in said[0]
    (out / INDEX).write_text("{not json", encoding="utf-8")
    said.clear()
    assert prepare.prepare(cfg_for(src, out), echo=said.append).decoded == first.decoded
    assert "damaged" in said[0]
    said.clear()
    assert prepare.prepare(cfg_for(src, out, crop="none"), echo=said.append).decoded == first.decoded
    assert "other settings (crop differ)" in said[0]


def test_transparency_goes_on_the_configured_background(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(path)
    out = data.load_image(path, 8, 3, background=(0, 0, 255))
    a = 128 / 255  # the closed-form blend a * red + (1 - a) * blue
    assert np.abs(out.astype(float) - [255 * a, 0, 255 * (1 - a)]).max() <= 1
    gray = data.load_image(path, 8, 1, background=(0, 0, 0))
    assert gray.shape == (8, 8, 1) and abs(int(gray[0, 0, 0]) - round(0.299 * 255 * a)) <= 1


def test_crop_none_pads_to_square(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path)
    out = data.load_image(path, 20, 3, crop="none", background=(0, 0, 255)).astype(int)
    assert np.abs(out[:4] - [0, 0, 255]).max() <= 2 and np.abs(out[-4:] - [0, 0, 255]).max() <= 2
    assert np.abs(out[6:14] - [255, 0, 0]).max() <= 2


def test_face_crop_centres_on_the_face_or_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 40:] = 255  # the right third is white
    Image.fromarray(arr).save(path)
    settings = data.DecodeSettings(20, 3, crop="face")
    monkeypatch.setattr(data, "find_face", lambda im: ((55.0, 10.0), "found"))
    found = data.decode_file(path, settings)
    assert found.face == "found" and (found.pixels == 255).all()  # the square is pushed to the right edge
    monkeypatch.setattr(data, "find_face", lambda im: (None, "no-opencv"))
    fallback = data.decode_file(path, settings)
    assert fallback.face == "no-opencv" and np.array_equal(fallback.pixels, arr[:, 20:40])  # centre crop

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(9)).save(src / "x.png")
    result = prepare.prepare(cfg_for(src, tmp_path / "c", crop="face"), echo=lambda s: None)
    assert result.faces == {"no-opencv": 1}
    assert "OpenCV not installed" in prepare.summary(result)


def test_face_detector_with_opencv_finds_no_face_in_noise(tmp_path):
    pytest.importorskip("cv2")
    im = Image.fromarray(pattern(3, (200, 120)))
    assert data.find_face(im) == (None, "none")


def test_unreadable_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(1)).save(src / "ok.png")
    locked = src / "locked.png"
    Image.fromarray(pattern(2)).save(locked)
    if os.geteuid() == 0:  # root reads any file: simulate the permission error instead
        real_open = builtins.open

        def guarded(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded)
    else:
        locked.chmod(0)
    try:
        result = prepare.prepare(cfg_for(src, tmp_path / "c"), echo=lambda s: None)
    finally:
        locked.chmod(0o644)
    reasons = {r.path: (r.reason, r.detail) for r in result.files}
    assert reasons["ok.png"] == (None, "") and reasons["locked.png"] == (data.UNREADABLE, "Permission denied")
    decoded = data.decode_file(locked, data.DecodeSettings(8, 3))
    if os.geteuid() == 0:
        assert decoded.reason == data.UNREADABLE


def test_near_duplicates_can_be_turned_off(corpus, tmp_path):
    src, _ = corpus
    result = prepare.prepare(cfg_for(src, tmp_path / "c", near_duplicate_threshold=-1), echo=lambda s: None)
    assert {r.path: r.reason for r in result.files}["sub/near.jpg"] is None


def test_similar_but_distinct_photos_are_kept(tmp_path):
    # Like two ORL photos of one person: a few perceptual-hash bits apart, but a local change (an
    # expression) far beyond what re-encoding does. Only the re-encoded copy is a near duplicate.
    src = tmp_path / "src"
    src.mkdir()
    base = pattern(7, (64, 64))
    Image.fromarray(base).save(src / "a.png")
    Image.fromarray(base).save(src / "b_reencoded.jpg", quality=70)
    changed = base.astype(int)
    changed[44:56, 16:48] += 30  # a lighter lower face
    changed = np.clip(changed, 0, 255).astype(np.uint8)
    Image.fromarray(changed).save(src / "c_other_photo.png")
    settings = data.DecodeSettings(SIZE, 3)
    hashes = {n: data.decode_file(src / n, settings).phash for n in ("a.png", "b_reencoded.jpg", "c_other_photo.png")}
    bits = {n: bin(h ^ hashes["a.png"]).count("1") for n, h in hashes.items()}
    assert bits["c_other_photo.png"] <= 6 and bits["b_reencoded.jpg"] <= 6  # both are hash candidates
    result = prepare.prepare(cfg_for(src, tmp_path / "c"), echo=lambda s: None)
    reasons = {r.path: r.reason for r in result.files}
    assert reasons == {"a.png": None, "b_reencoded.jpg": prepare.NEAR_DUPLICATE, "c_other_photo.png": None}


def test_near_duplicate_rule_needs_close_hashes_and_close_thumbnails():
    thumb = np.full(prepare.THUMB**2, 100, np.uint8)
    off_by = lambda levels: (thumb.astype(int) + levels).astype(np.uint8)  # noqa: E731 - RMS = levels
    found = prepare.near_duplicates([("a", 0b1011, thumb), ("b", 0b1011, off_by(2)), ("c", 0b1011, off_by(5)),
                                     ("d", 0b1111011, off_by(1))], threshold=2, max_rms=4.0)
    assert found == {"b": ("a", 0, 2.0)}  # c: 5 levels apart; d: 3 bits apart


def test_clear_errors(tmp_path):
    def run(*args):
        return CliRunner().invoke(main, ["prepare", *map(str, args)], catch_exceptions=False)

    result = run(tmp_path / "missing")
    assert result.exit_code == 1 and "not a folder" in result.output
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x", encoding="utf-8")
    result = run(tmp_path / "e", "--out", tmp_path / "c")
    assert result.exit_code == 1 and "no usable image" in result.output and "notes.txt" in result.output
    assert (tmp_path / "c" / MANIFEST).is_file()
    result = run(tmp_path / "e", "--out", tmp_path / "e" / "cache")
    assert result.exit_code == 1 and "inside the source folder" in result.output
    assert not (tmp_path / "e" / "cache").exists()
    result = run(tmp_path / "e", "--set", "data.background=mauvish")
    assert result.exit_code == 2 and "data.background" in result.output


def test_prepare_does_not_import_tensorflow(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(1)).save(src / "x.png")
    code = ("import sys; from ddpm_tf.cli import main\n"
            "try:\n    main(['prepare', sys.argv[1], '--out', sys.argv[2]])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'tensorflow' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "c")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_out_folder_keeps_files_it_did_not_write(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shared"
    src.mkdir()
    out.mkdir()
    for i in range(2):
        Image.fromarray(pattern(i)).save(src / f"{i}.png")
    (out / "images-2023.jpg").write_bytes(b"a user's file")
    (out / ".images-00000000-00000.npy.tmp-1").write_bytes(b"left by a killed write")
    prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    Image.fromarray(pattern(7)).save(src / "new.png")  # a new generation of shards replaces the old one
    prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    names = sorted(p.name for p in out.iterdir())
    assert "images-2023.jpg" in names and not any(".tmp-" in n for n in names)
    assert len([n for n in names if n.endswith(".npy")]) == 1
