"""Labels from the data (issue 13, part 1): class folders, caption tags, the balance table, the cache, tf.data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_images
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.config import DataConfig, load_config
from ddpm_tf.data import labels as labels_mod
from ddpm_tf.data.cache import INDEX, MANIFEST, load_cache
from ddpm_tf.data.labels import LabelError, Labels, LabelSet, normalise_tag, parse_tags
from ddpm_tf.data.prepare import prepare, summary
from ddpm_tf.errors import ConfigError, DataError

SIZE = 16


def cfg(src: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(dir=str(src), image_size=SIZE, min_side=10, cache=str(out), workers=1, **kw)


def rows_of(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]}


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes and mtime: the source is only read."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def quiet(*args, **kw):
    return prepare(*args, echo=lambda s: None, **kw)


# --- folders ----------------------------------------------------------------------------------------------------

def test_folders_classes_deep_folders_and_top_level_unlabelled(tmp_path):
    src, out = tmp_path / "people", tmp_path / "cache"
    write_images(src / "s10", 2, seed=1)
    write_images(src / "s2", 2, seed=2)
    write_images(src / "s2" / "deeper" / "still", 1, seed=3)  # belongs to s2
    write_images(src, 2, seed=4)  # directly in data.dir: unlabelled
    prepared = quiet(cfg(src, out, labels="folders"))
    label_set = prepared.labels.label_set
    assert label_set == LabelSet("folders", ("s10", "s2"))  # plain sorted(): the class index, reproducible
    expected = {"s10/img000.png": "s10", "s10/img001.png": "s10", "s2/img000.png": "s2", "s2/img001.png": "s2",
                "s2/deeper/still/img000.png": "s2", "img000.png": None, "img001.png": None}
    rows = rows_of(out)
    assert {p: r["label"] for p, r in rows.items()} == expected
    matrix = prepared.labels.matrix
    assert matrix.shape == (7, 2) and matrix.dtype == np.uint8
    for path, name in expected.items():
        want = np.zeros(2, np.uint8) if name is None else (np.arange(2) == label_set.names.index(name))
        assert np.array_equal(matrix[rows[path]["index"]], want), path
    assert prepared.labels.counts() == {"s10": 2, "s2": 3} and prepared.labels.unlabelled() == 2
    text = summary(prepared)
    assert "2 classes, 5 images in them, 2 unlabelled" in text
    assert text.splitlines()[-3].split() == ["s2", "3", "s10", "2"]  # natural order for reading
    assert "warning: class s10 has only 2 images (data.min_class_images = 5)" in text


def test_a_class_folder_with_no_usable_image_is_one_line_exit_1(tmp_path):
    src, out = tmp_path / "people", tmp_path / "cache"
    write_images(src / "s1", 2, seed=1)
    junk = src / "s7"
    junk.mkdir()
    (junk / "notes.txt").write_text("x", encoding="utf-8")
    (junk / "page.png").write_text("<html></html>", encoding="utf-8")
    write_images(junk / "small", 1, size=(8, 8))
    before = snapshot(src)
    args = ["prepare", str(src), "--size", str(SIZE), "--out", str(out), "--set", "data.min_side=10",
            "--set", "data.labels=folders"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == ("Error: data.dir: class folder s7 has no usable image (3 files: "
                                              "2 not-an-image, 1 too-small); add images or move the folder out")
    assert "Traceback" not in result.output and snapshot(src) == before
    (junk / "notes.txt").unlink()  # nothing was lost: the decoded images were kept, the fix decodes nothing
    (junk / "page.png").unlink()
    (junk / "small" / "img000.png").unlink()
    again = quiet(cfg(src, out, labels="folders"))
    assert again.decoded == 0 and again.labels.label_set.names == ("s1",)


def test_folders_with_every_image_at_the_top_level_is_an_error(tmp_path):
    write_images(tmp_path / "flat", 2)
    with pytest.raises(DataError, match=r"data.labels = folders, but no folder under .* holds a used image"):
        quiet(cfg(tmp_path / "flat", tmp_path / "cache", labels="folders"))


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="names must be valid Unicode there")
def test_a_class_folder_whose_name_is_not_utf8_is_shown(tmp_path):
    src = tmp_path / "src"
    write_images(Path(os.fsdecode(bytes(src) + b"/caf\xe9")), 1)
    prepared = quiet(cfg(src, tmp_path / "cache", labels="folders"))
    assert prepared.labels.label_set.names == ("caf\\xe9",)
    assert json.dumps(prepared.labels.label_set.to_dict(), ensure_ascii=False).encode("utf-8")  # valid Unicode


# --- tags -------------------------------------------------------------------------------------------------------

def test_tag_normalisation():
    assert normalise_tag("  Blue_Eyes \t") == "blue eyes" and normalise_tag("A  B__c") == "a b c"
    assert parse_tags("Smile, smile ,, blue_eyes,\n Hat , ,SMILE\n") == ["smile", "blue eyes", "hat"]
    assert parse_tags("") == [] and parse_tags(" , ,") == []


def write_captioned(src: Path, captions: list) -> list[Path]:
    """One random image per caption; a caption None has no .txt, bytes are written as they are."""
    paths = write_images(src, len(captions))
    for path, text in zip(paths, captions):
        if text is not None:
            path.with_suffix(".txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return paths


CAPTIONS = ["Smile, Blue_Eyes", "\ufeffsmile,  blue   eyes, hat", "smile,,smile", "glasses", "", None,
            "smile, glasses, Rare_One", b"caf\xe9, smile"]


def test_tags_vocabulary_rare_tags_and_caption_rows(tmp_path):
    src, out = tmp_path / "tagged", tmp_path / "cache"
    write_captioned(src, CAPTIONS)
    (src / "notes.txt").write_text("not a caption", encoding="utf-8")
    before = snapshot(src)
    lines = []
    prepared = prepare(cfg(src, out, labels="tags"), echo=lines.append)
    assert snapshot(src) == before
    # On >= 2 used images, most frequent first; the BOM is not part of the first tag.
    assert prepared.labels.label_set == LabelSet("tags", ("smile", "blue eyes", "glasses"))
    rows = rows_of(out)
    assert [rows[f"img{i:03d}.png"]["tags"] for i in range(8)] == [
        ["smile", "blue eyes"], ["smile", "blue eyes", "hat"], ["smile"], ["glasses"], [], [],
        ["smile", "glasses", "rare one"], []]
    matrix = [prepared.labels.matrix[rows[f"img{i:03d}.png"]["index"]].tolist() for i in range(8)]
    assert matrix == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert prepared.labels.counts() == {"smile": 4, "blue eyes": 2, "glasses": 2}
    assert prepared.labels.unlabelled() == 3
    assert rows["img000.txt"]["reason"] == "caption" and rows["img000.txt"]["detail"] == "tags of img000.png"
    assert rows["img000.txt"]["status"] == "skipped" and rows["img000.txt"]["tags"] is None
    assert rows["notes.txt"]["reason"] == "not-an-image"
    assert rows["img007.txt"]["detail"].endswith("is not UTF-8 text (byte 0xe9 at offset 3): read as no tags")
    text = "\n".join(lines)
    assert "3 tags on >= 2 images (data.min_tag_count), 5 images tagged, 3 unlabelled" in text
    assert "rare tags, on fewer than 2 images, not conditioned on: 2: hat (1), rare one (1)" in text
    assert "warning: caption img007.txt is not UTF-8 text (byte 0xe9 at offset 3): read as no tags" in text
    assert "warning: tag glasses has only 2 images (data.min_class_images = 5)" in text
    assert any(line.split()[:2] == ["caption", "7"] for line in (s.strip() for s in text.splitlines()))
    # A higher threshold is a smaller vocabulary, from the same cache: nothing decoded.
    stricter = quiet(cfg(src, out, labels="tags", min_tag_count=3))
    assert stricter.decoded == 0 and stricter.labels.label_set.names == ("smile",)


def test_tags_with_no_tag_often_enough_is_an_error(tmp_path):
    write_captioned(tmp_path / "t", ["a", "b"])
    with pytest.raises(DataError, match=r"no tag is on at least data.min_tag_count = 2 used images \(2 caption files"):
        quiet(cfg(tmp_path / "t", tmp_path / "cache", labels="tags"))


def test_a_changed_caption_is_incremental_and_labels_survive_the_cache(tmp_path):
    src, out = tmp_path / "tagged", tmp_path / "cache"
    paths = write_captioned(src, ["smile", "smile, hat", "hat", "glasses"])
    first = quiet(cfg(src, out, labels="tags"))
    assert first.labels.label_set.names == ("hat", "smile")
    shards = sorted(p.name for p in out.glob("images-*.npy"))
    paths[3].with_suffix(".txt").write_text("glasses, Smile", encoding="utf-8")
    paths[0].with_suffix(".txt").unlink()
    lines = []
    second = prepare(cfg(src, out, labels="tags"), echo=lines.append, only_changes=True)
    assert second.decoded == 0 and second.reused == 4
    assert sorted(p.name for p in out.glob("images-*.npy")) == shards  # the pixels stay as they are
    assert second.labels.label_set.names == ("hat", "smile")
    assert second.labels.matrix.tolist() == [[0, 0], [1, 1], [1, 0], [0, 1]]
    assert lines and "labels from tags" in lines[-1]  # a label change is a change: the summary is shown
    assert rows_of(out)["img003.png"]["tags"] == ["glasses", "smile"] and "img000.txt" not in rows_of(out)
    # The cache holds the labels: read again, they are the same rows.
    cache, why = load_cache(out, second.settings)
    assert why is None
    stored = cache.labels()
    assert stored.label_set == second.labels.label_set and np.array_equal(stored.matrix, second.labels.matrix)
    assert np.array_equal(second.images()[3], first.images()[3])
    # Unchanged: nothing is written, nothing printed by a trainer's prepare.
    index_mtime = (out / INDEX).stat().st_mtime_ns
    lines.clear()
    quiet_again = prepare(cfg(src, out, labels="tags"), echo=lines.append, only_changes=True)
    assert quiet_again.decoded == 0 and lines == [] and (out / INDEX).stat().st_mtime_ns == index_mtime
    # A new file outside the index (a caption of no image) still reaches the manifest.
    (src / "notes.txt").write_text("x", encoding="utf-8")
    quiet(cfg(src, out, labels="tags"))
    assert rows_of(out)["notes.txt"]["reason"] == "not-an-image" and (out / INDEX).stat().st_mtime_ns == index_mtime
    # Labels off again: the cache forgets them (no stale labels for a reader of the cache).
    off = quiet(cfg(src, out))
    assert off.labels is None and load_cache(out, off.settings)[0].labels() is None
    assert json.loads((out / INDEX).read_text(encoding="utf-8"))["labels"] is None


def test_a_read_only_cache_is_still_used_when_only_other_files_change(tmp_path, monkeypatch):
    src, out = tmp_path / "tagged", tmp_path / "cache"
    write_captioned(src, ["smile", "smile"])
    quiet(cfg(src, out, labels="tags"))
    manifest = (out / MANIFEST).read_bytes()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (str(p) != str(out) or not mode & os.W_OK)
                        and real_access(p, mode))  # root writes anywhere: chmod cannot make it read-only
    (src / "notes.txt").write_text("x", encoding="utf-8")
    again = quiet(cfg(src, out, labels="tags"))
    assert again.decoded == 0 and again.labels.counts() == {"smile": 2}
    assert (out / MANIFEST).read_bytes() == manifest


def test_damaged_labels_in_the_index_rebuild_the_cache(tmp_path):
    src, out = tmp_path / "people", tmp_path / "cache"
    write_images(src / "a", 2)
    prepared = quiet(cfg(src, out, labels="folders"))
    index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    index["labels"]["rows"][0] = [5]
    (out / INDEX).write_text(json.dumps(index), encoding="utf-8")
    cache, why = load_cache(out, prepared.settings)
    assert cache is None and "damaged" in why and "row 0" in why


def test_labels_off_is_unchanged(tmp_path):
    src, out = tmp_path / "plain", tmp_path / "cache"
    write_captioned(src, ["smile", "smile"])
    prepared = quiet(cfg(src, out))
    assert prepared.labels is None and prepared.label_info is None
    rows = rows_of(out)
    assert rows["img000.txt"]["reason"] == "not-an-image"
    assert all("label" not in r and "tags" not in r for r in rows.values())
    assert "labels from" not in summary(prepared)
    assert load_cache(out, prepared.settings)[0].labels() is None


def test_config_keys():
    cfg_ = load_config(None, ["data.labels=tags", "data.min_tag_count=3", "data.min_class_images=1"])
    assert (cfg_.data.labels, cfg_.data.min_tag_count, cfg_.data.min_class_images) == ("tags", 3, 1)
    assert load_config(None).data.labels == "none"
    with pytest.raises(ConfigError, match="data.labels = 'faces' is not allowed: expected one of none, folders, tags"):
        load_config(None, ["data.labels=faces"])
    with pytest.raises(ConfigError, match="data.min_tag_count = 0 is out of range"):
        load_config(None, ["data.min_tag_count=0"])


# --- the balance table ------------------------------------------------------------------------------------------

def test_balance_table_of_forty_people_is_one_screen(tmp_path):
    src = tmp_path / "orl"
    for k in range(1, 41):
        write_images(src / f"s{k}", 1, seed=k)
    prepared = quiet(cfg(src, tmp_path / "cache", labels="folders"))
    assert prepared.labels.label_set.names == tuple(sorted(f"s{k}" for k in range(1, 41)))  # s1, s10, s11, ...
    table = labels_mod.report(prepared.label_info)
    assert table[0] == "  labels from folders: 40 classes, 40 images in them, 0 unlabelled"
    assert [line.split()[::2] for line in table[1:5]] == [[f"s{k}" for k in range(r, r + 10)] for r in (1, 11, 21, 31)]
    assert table[5:] == ["warning: class s1 has only 1 image (data.min_class_images = 5)",
                         "warning: class s2 has only 1 image (data.min_class_images = 5)",
                         "warning: class s3 has only 1 image (data.min_class_images = 5)",
                         "warning: class s4 has only 1 image (data.min_class_images = 5)",
                         "warning: (+36 more classes with fewer than 5 images)"]


def test_balance_table_of_many_tags_ends_with_how_many_more():
    vocab = tuple(f"a rather long tag number {k:04d}" for k in range(500))
    matrix = np.ones((6, 500), np.uint8)
    found = labels_mod.Found(Labels(LabelSet("tags", vocab), matrix), {}, min_class_images=7, min_tag_count=2,
                             rare={f"r{k}": 1 for k in range(9)})
    lines = labels_mod.report(found)
    assert len(lines) <= 40 and all(len(line) <= 110 for line in lines)
    table = lines[1:lines.index("    (+416 more)") + 1]
    assert len(table) == labels_mod.TABLE_ROWS + 1 and table[0].split()[-1] == "6"  # 28 rows of 3 = 84 shown
    assert lines[-6].endswith("r0 (1), r1 (1), r2 (1), r3 (1), r4 (1) (+4 more)")
    assert lines[-2] == "warning: tag a rather long tag number 0003 has only 6 images (data.min_class_images = 7)"
    assert lines[-1] == "warning: (+496 more tags with fewer than 7 images)"


# --- the label set: what sampling and eval ask for -------------------------------------------------------------

def test_resolve_names_the_closest_known_classes_first():
    people = LabelSet("folders", tuple(sorted(f"s{k}" for k in range(1, 41))))
    assert people.resolve("s7") == "s7" and len(people) == 40
    with pytest.raises(LabelError) as err:
        people.resolve("s77")
    assert str(err.value).startswith("unknown class 's77': known classes are s7, s17, s27, s37, ")
    assert str(err.value).endswith(", ... (40)") and err.value.exit_code == 2
    assert isinstance(err.value, DataError)
    tags = LabelSet("tags", ("smile", "blue eyes"))
    assert tags.resolve("Blue_Eyes") == "blue eyes"
    with pytest.raises(LabelError, match=r"^unknown tag 'smille': known tags are smile, blue eyes \(2\)$"):
        tags.resolve("smille")


def test_vector_is_multi_hot_and_needs_a_name():
    tags = LabelSet("tags", ("smile", "blue eyes", "glasses"))
    v = tags.vector(parse_tags("Glasses, smile, SMILE"))
    assert v.dtype == np.float32 and v.tolist() == [1.0, 0.0, 1.0]
    assert LabelSet("folders", ("a", "b")).vector(["b"]).tolist() == [0.0, 1.0]
    with pytest.raises(LabelError, match='^--tags: no tag given: expected comma-separated tags, e.g. --tags "smile'):
        tags.vector(parse_tags(" , "))
    with pytest.raises(LabelError, match="^--class: no class given: known classes are a, b"):
        LabelSet("folders", ("a", "b")).vector([])
    with pytest.raises(LabelError, match="unknown tag 'hat'"):
        tags.vector(["smile", "hat"])


def test_label_set_round_trip_and_refusals():
    people = LabelSet("folders", ["s1", "s2"])
    assert people.names == ("s1", "s2") and LabelSet.from_dict(people.to_dict()) == people
    assert json.loads(json.dumps(people.to_dict())) == {"mode": "folders", "names": ["s1", "s2"]}
    for bad in ({"mode": "colours", "names": ["a"]}, {"mode": "tags", "names": ["a", "a"]}, {"mode": "tags"},
                {"mode": "tags", "names": [""]}, ["a"]):
        with pytest.raises(LabelError):
            LabelSet.from_dict(bad)


# --- tf.data ----------------------------------------------------------------------------------------------------

GREYS = (20, 70, 220)  # the mean grey of each class's images; random unlabelled images are about 127


def test_dataset_yields_matching_images_and_labels(tmp_path):
    """Class k's images have mean grey GREYS[k], whatever the flip: each x tells its y."""
    src = tmp_path / "classes"
    rng = np.random.default_rng(0)
    for grey, name in zip(GREYS, ("dark", "mid", "pale")):
        (src / name).mkdir(parents=True)
        for i in range(5):
            noise = rng.integers(-15, 16, (SIZE, SIZE, 3))
            Image.fromarray((grey + noise).astype(np.uint8)).save(src / name / f"{i}.png")
    write_images(src, 2)  # unlabelled rows in between
    prepared = quiet(cfg(src, tmp_path / "cache", labels="folders", near_duplicate_threshold=-1))
    from ddpm_tf.data.pipeline import make_dataset

    names, matrix = prepared.labels.label_set.names, prepared.labels.matrix
    assert names == ("dark", "mid", "pale")
    for images in (prepared.images(), prepared.images(memory_mb=0)):  # in memory and memory-mapped
        seen = np.zeros(len(names) + 1, int)
        plain = make_dataset(images, 4, seed=5)
        for (x, y), x_plain in zip(make_dataset(images, 4, seed=5, labels=matrix).take(9), plain.take(9)):
            x, y = x.numpy(), y.numpy()
            assert np.array_equal(x, x_plain.numpy())  # the images and their order do not depend on labels
            assert y.dtype == np.float32 and y.shape == (len(x), 3)  # an epoch ends with a short batch
            for xi, yi in zip(x, y):
                grey = (xi.mean() + 1) * 127.5
                k = int(np.argmin(np.abs(np.array(GREYS + (127,)) - grey)))
                assert abs(grey - (GREYS + (127,))[k]) < 12
                assert yi.tolist() == (np.eye(3)[k].tolist() if k < 3 else [0.0, 0.0, 0.0])
                seen[k] += 1
        assert (seen > 0).all()
