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

from ddpm_tf.cli import main
from ddpm_tf.config import DataConfig
from ddpm_tf.data import decode as data
from ddpm_tf.data import prepare
from ddpm_tf.data.cache import INDEX, MANIFEST

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
            h.update(os.fsencode(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_size}|{st.st_mtime_ns}"))
            if os.path.islink(p):
                h.update(os.fsencode(os.readlink(p)))
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


# --- issue 11: odd names, links, special files, the cache folder, one decoder for one file ------------------

needs_byte_names = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names must be valid Unicode there")


@needs_byte_names
def test_names_that_are_not_utf8_are_used_and_shown(tmp_path):
    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    Image.fromarray(pattern(1)).save(os.fsdecode(bytes(src) + b"/caf\xe9.png"))
    (src / os.fsdecode(b"z\xff.png")).write_bytes((src / os.fsdecode(b"caf\xe9.png")).read_bytes())
    (src / os.fsdecode(b"\xfe.txt")).write_bytes(b"notes")
    Image.fromarray(pattern(2)).save(src / "plain.png")
    before = tree_hash(src)
    args = ["prepare", str(src), "--size", str(SIZE), "--out", str(out), "--set", "data.min_side=10"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "caf\\xe9.png" in result.output and "z\\xff.png (same bytes as caf\\xe9.png)" in result.output
    manifest = json.loads((out / MANIFEST).read_bytes().decode("utf-8"))  # strict UTF-8 JSON
    rows = {r["path"]: r for r in manifest["files"]}
    assert set(rows) == {"caf\\xe9.png", "plain.png", "z\\xff.png", "\\xfe.txt"}
    assert bytes.fromhex(rows["caf\\xe9.png"]["path_bytes"]) == b"caf\xe9.png" and "path_bytes" not in rows["plain.png"]
    assert rows["caf\\xe9.png"]["status"] == "used" and rows["z\\xff.png"]["duplicate_of"] == "caf\\xe9.png"
    assert rows["\\xfe.txt"]["reason"] == data.NOT_AN_IMAGE
    assert tree_hash(src) == before
    again = prepare.prepare(cfg_for(src, out), echo=lambda s: None)  # the odd names are found again by their bytes
    assert again.decoded == 0 and again.count == 2
    assert len(list(out.glob("images-*.npy"))) == 1


def test_a_failed_write_leaves_the_old_cache_and_no_orphan_shard(tmp_path, monkeypatch):
    from ddpm_tf.data import cache as cache_mod

    src, out = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    Image.fromarray(pattern(1)).save(src / "a.png")
    real_write = cache_mod.atomic_write_bytes

    def disk_full_at_the_index(path, payload):
        if Path(path).name == INDEX:
            raise OSError(28, "No space left on device")
        return real_write(path, payload)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", disk_full_at_the_index)
    result = CliRunner().invoke(main, ["prepare", str(src), "--size", str(SIZE), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "No space left on device" in result.output and str(out) in result.output
    assert not list(out.glob("images-*")) and not list(out.glob(".*"))
    monkeypatch.setattr(cache_mod, "atomic_write_bytes", real_write)
    first = prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    shards = sorted(p.name for p in out.glob("images-*.npy"))
    Image.fromarray(pattern(2)).save(src / "b.png")  # a new training set: a new generation of shards
    monkeypatch.setattr(cache_mod, "atomic_write_bytes", disk_full_at_the_index)
    with pytest.raises(data.DataError, match="could not be written"):
        prepare.prepare(cfg_for(src, out), echo=lambda s: None)
    assert sorted(p.name for p in out.glob("images-*.npy")) == shards  # the old cache, whole and alone
    monkeypatch.setattr(cache_mod, "atomic_write_bytes", real_write)
    assert np.array_equal(first.images(), prepare.prepare(cfg_for(src, out), echo=lambda s: None).images()[:1])


def test_folder_links_to_an_ancestor_are_loops(tmp_path):
    top = tmp_path / "top"
    src = top / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(pattern(1)).save(src / "a.png")
    Image.fromarray(pattern(2)).save(top / "outside_the_source.png")  # never scanned: the links loop
    links = {"up": "..", "sub/upup": "../..", "abs_parent": str(top), "abs_self": str(src), "root": "/",
             "chain_a": "chain_b", "chain_b": "sub/upup"}
    for name, target in links.items():
        os.symlink(target, src / name)
    os.symlink(src / "sub", src / "alias")  # a folder link that does not loop: followed
    result = CliRunner().invoke(main, ["prepare", str(src), "--size", str(SIZE), "--out", str(tmp_path / "c"),
                                       "--set", "data.min_side=10"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = manifest_of(tmp_path / "c")
    assert {p: r["reason"] for p, r in rows.items()} == {"a.png": None, **dict.fromkeys(
        ["up", "sub/upup", "alias/upup", "abs_parent", "abs_self", "root", "chain_a", "chain_b"], prepare.SYMLINK_LOOP)}
    assert rows["up"]["detail"] == "link to .., a folder containing it"


def test_links_to_files_outside_devices_and_pipes(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    Image.fromarray(pattern(1)).save(outside / "elsewhere.png")
    os.symlink(outside / "elsewhere.png", src / "linked.png")
    os.symlink("/dev/zero", src / "zero.png")
    os.mkfifo(src / "pipe.png")
    before = tree_hash(outside)
    result = prepare.prepare(cfg_for(src, tmp_path / "c"), echo=lambda s: None)
    assert {r.path: r.reason for r in result.files} == {"linked.png": None, "pipe.png": prepare.NOT_A_FILE,
                                                        "zero.png": prepare.NOT_A_FILE}
    assert tree_hash(outside) == before


def test_a_file_that_changes_between_scan_and_decode(tmp_path, monkeypatch):
    # Scanned as regular files; then one becomes a pipe (a plain open would block forever) and one
    # unreadable before its decode (hashing read it): each is skipped with its reason.
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(("ok.png", "piped.png", "locked.png")):
        Image.fromarray(pattern(i)).save(src / name)
    real_scan, real_open, locked = prepare.scan, builtins.open, str(src / "locked.png")
    opened = []

    def scan_then_swap(root):
        records = real_scan(root)
        (src / "piped.png").unlink()
        os.mkfifo(src / "piped.png")
        return records

    def open_once(file, *args, **kwargs):  # readable for the hash, not for the decode
        opened.append(str(file))
        if str(file) == locked and opened.count(locked) > 1:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(prepare, "scan", scan_then_swap)
    monkeypatch.setattr(builtins, "open", open_once)
    result = prepare.prepare(cfg_for(src, tmp_path / "c"), echo=lambda s: None)
    assert {r.path: (r.reason, r.detail) for r in result.files} == {
        "ok.png": (None, ""), "piped.png": (prepare.NOT_A_FILE, "a device, socket, pipe or folder"),
        "locked.png": (data.UNREADABLE, "Permission denied")}


def test_a_real_file_is_kept_before_a_link_to_the_same_image(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(pattern(5)).save(src / "plain.jpg", quality=95)
    os.symlink("plain.jpg", src / "link_to_plain.jpg")  # sorts first
    Image.fromarray(pattern(2)).save(src / "sub" / "x.png")
    os.symlink("sub", src / "alias")  # alias/x.png sorts before sub/x.png
    Image.fromarray(pattern(1)).save(src / "b_real.png")
    Image.fromarray(pattern(1)).save(elsewhere / "copy.jpg", quality=80)  # 4 hash bits, 3 grey levels away
    os.symlink(elsewhere / "copy.jpg", src / "a_near_link.jpg")  # a near duplicate that sorts first
    result = prepare.prepare(cfg_for(src, tmp_path / "c"), echo=lambda s: None)
    rows = {r.path: (r.reason, r.duplicate_of) for r in result.files}
    assert rows == {"plain.jpg": (None, None), "link_to_plain.jpg": (prepare.DUPLICATE, "plain.jpg"),
                    "sub/x.png": (None, None), "alias/x.png": (prepare.DUPLICATE, "sub/x.png"),
                    "b_real.png": (None, None), "a_near_link.jpg": (prepare.NEAR_DUPLICATE, "b_real.png")}
    assert [r.index for r in result.files if r.reason is None] == [0, 1, 2]  # indices stay in path order


def test_cache_folder_problems_are_one_line_before_any_work(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(pattern(1)).save(src / "a.png")
    real_scan = prepare.scan
    monkeypatch.setattr(prepare, "scan", lambda root: pytest.fail("scanned before the cache folder was checked"))

    def run(*args):
        result = CliRunner().invoke(main, ["prepare", str(src), "--size", str(SIZE), *args], catch_exceptions=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "--out" in result.output and "data.cache" in result.output
        return result.output

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "data").write_text("a file where the default cache would go", encoding="utf-8")
    assert "data/cache/src-" in run() and "data is a file" in run()
    (work / "data").unlink()
    real_access = os.access
    read_only = {str(work), "."}  # root writes anywhere: chmod cannot make a folder read-only for this test
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (str(p) not in read_only or not mode & os.W_OK)
                        and real_access(p, mode))
    assert "cannot be created" in run() and "is not writable" in run()
    assert not (work / "data").exists()
    (tmp_path / "notes.txt").write_text("a user's file", encoding="utf-8")
    assert "is a file, expected a folder" in run("--set", f"data.cache={tmp_path / 'notes.txt'}")
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "a user's file"
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only.add(str(cache))
    assert "is not writable, and holds no cache" in run("--out", str(cache))
    # A sound read-only cache is still read while nothing needs writing.
    read_only.discard(str(cache))
    monkeypatch.setattr(prepare, "scan", real_scan)
    prepare.prepare(cfg_for(src, cache), echo=lambda s: None)
    read_only.add(str(cache))
    assert prepare.prepare(cfg_for(src, cache), echo=lambda s: None).decoded == 0
    Image.fromarray(pattern(2)).save(src / "b.png")
    assert "its cache cannot be used (it was made with other settings (min_side differ))" in run("--out", str(cache))
    assert "1 new or changed files need decoding" in run("--out", str(cache), "--set", "data.min_side=10")


def test_one_file_is_decoded_with_every_guard_of_prepare(corpus, tmp_path):
    src, expect = corpus
    out = tmp_path / "cache"
    cfg = cfg_for(src, out, max_pixels=50_000_000)
    prepared = prepare.prepare(cfg, echo=lambda s: None)
    images = prepared.images()
    decoded_reasons = {data.EMPTY, data.CORRUPT, data.TOO_SMALL, data.BOMB, data.NOT_AN_IMAGE}
    for rec in prepared.files:
        if rec.reason is None:
            assert np.array_equal(data.decode_checked(rec.full, cfg), images[rec.index]), rec.path
        elif rec.reason in decoded_reasons and rec.full.suffix != ".txt":
            with pytest.raises(data.DataError) as err:
                data.decode_checked(rec.full, cfg)
            assert str(err.value) == f"{rec.full}: cannot use this image: {rec.reason} ({rec.detail})"
    with pytest.raises(data.DataError, match="data.max_pixels = 50,000,000"):
        data.decode_checked(src / "bomb.png", cfg)
