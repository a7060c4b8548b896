"""Labels end to end through the CLI: a tiny two-class run trains, saves its classes, samples a chosen class
(with the class and guidance in the PNG metadata, regenerated exactly by --seeds), refuses unknown classes,
labels on an unlabelled run and a resume whose classes changed; the same for caption tags."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import class_images, write_config
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.config import load_config
from ddpm_tf.images import read_png_metadata
from ddpm_tf.runs import RunDir, export_labels


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im).astype(int)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(config path, RunDir) of a two-class run (bright, dark) trained for one epoch."""
    from ddpm_tf.train import train

    root = tmp_path_factory.mktemp("labelled")
    class_images(root / "images" / "bright", 210, seed=1)
    class_images(root / "images" / "dark", 40, seed=2)
    cfg = write_config(root / "c.yaml", {"run": {"dir": str(root / "runs" / "lab")},
                                         "data": {"dir": str(root / "images"), "labels": "folders",
                                                  "min_class_images": 2, "near_duplicate_threshold": -1},
                                         "train": {"epochs": 1}})
    train(load_config(cfg), echo=lambda m: None, log=lambda m: None)
    return cfg, RunDir(root / "runs" / "lab")


@pytest.fixture
def run_copy(labelled, tmp_path):
    shutil.copytree(labelled[1].path, tmp_path / "lab")
    return tmp_path / "lab"


def test_the_run_and_its_exports_keep_the_classes(labelled):
    _, run = labelled
    saved = run.load_labels()
    assert saved.mode == "folders" and saved.names == ("bright", "dark")
    step, export = run.latest_export()
    assert export_labels(export) == saved


def test_sample_a_class_and_regenerate_it_from_its_metadata(run_copy, tmp_path):
    result = invoke("sample", "--run", run_copy, "--class", "all", "--n", 2, "--seed", 5, "--sampler", "ddim",
                    "--steps", 4, "--guidance", 3, "--out", tmp_path / "all.png")
    assert result.exit_code == 0, result.output
    singles = sorted((tmp_path / "all").iterdir())
    assert [p.name for p in singles] == ["0000-bright-seed5.png", "0001-bright-seed6.png", "0002-dark-seed5.png",
                                         "0003-dark-seed6.png"]
    meta = read_png_metadata(singles[2])
    assert meta["ddpm_tf:class"] == "dark" and meta["ddpm_tf:guidance"] == "3.0" and meta["ddpm_tf:seed"] == "5"
    with Image.open(tmp_path / "all.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 rows (classes) of 2 seeds, 16 px + 2 px padding
    result = invoke("sample", "--run", run_copy, "--class", meta["ddpm_tf:class"], "--seeds", meta["ddpm_tf:seed"],
                    "--guidance", meta["ddpm_tf:guidance"], "--sampler", "ddim", "--steps", 4,
                    "--out", tmp_path / "again.png")
    assert result.exit_code == 0, result.output
    assert np.abs(pixels(tmp_path / "again" / "0000-dark-seed5.png") - pixels(singles[2])).max() <= 1


def test_label_errors_are_one_line_and_name_what_is_known(run_copy, tiny_project, tmp_path):
    result = invoke("sample", "--run", run_copy, "--class", "brigth", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "unknown class 'brigth': known classes are bright, dark" in result.output
    result = invoke("sample", "--run", run_copy, "--tags", "smile", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "this run's labels are classes" in result.output
    result = invoke("sample", "--run", run_copy, "--class", "dark", "--guidance", "-1")
    assert result.exit_code == 2 and "--guidance" in result.output
    result = invoke("img2img", tmp_path / "nothing.png", "--run", run_copy)  # the click guard still comes first
    assert result.exit_code == 2
    assert not (tmp_path / "x.png").exists() and not (run_copy / "samples").exists()


def test_labels_on_an_unlabelled_run_say_how_to_train_one(tmp_path):
    from ddpm_tf.train import train

    class_images(tmp_path / "images", 120)
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(tmp_path / "run")},
                                             "data": {"dir": str(tmp_path / "images"),
                                                      "near_duplicate_threshold": -1},
                                             "train": {"epochs": 1}})
    train(load_config(cfg), echo=lambda m: None, log=lambda m: None)
    for flag in (["--class", "a"], ["--guidance", "2"], ["--tags", "x"]):
        result = invoke("sample", "--run", tmp_path / "run", *flag)
        assert result.exit_code == 2, result.output
        assert "this run has no labels" in result.output and "data.labels: folders" in result.output
    for flag in (["--per-class"], ["--guidance", "1,2"], ["--class", "a"]):
        result = invoke("eval", "--run", tmp_path / "run", *flag)
        assert result.exit_code == 2, result.output
        assert f"no labels (it was trained with data.labels: none), so {flag[0]}" in result.output
    assert not (tmp_path / "run" / "labels.json").exists() and not (tmp_path / "run" / "eval.csv").exists()


def test_a_resume_whose_classes_changed_is_refused_and_the_run_is_kept(labelled, tmp_path):
    from ddpm_tf.errors import ConfigError
    from ddpm_tf.train import train

    cfg_path, run = labelled
    body = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    images = tmp_path / "images"
    shutil.copytree(body["data"]["dir"], images)
    class_images(images / "grey", 128, seed=3)
    shutil.copytree(run.path, tmp_path / "lab")
    body["run"]["dir"], body["data"]["dir"] = str(tmp_path / "lab"), str(images)
    body["data"]["cache"], body["train"]["epochs"] = str(tmp_path / "cache"), 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    before = sorted(p.name for p in (tmp_path / "lab" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"labels changed \(2 classes -> 3 classes; new: grey\)"):
        train(load_config(tmp_path / "c.yaml"), echo=lambda m: None, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "lab" / "checkpoints").iterdir()) == before
    assert RunDir(tmp_path / "lab").load_labels().names == ("bright", "dark")
    shutil.rmtree(images / "grey")  # the same classes again: the run resumes
    train(load_config(tmp_path / "c.yaml"), echo=lambda m: None, log=lambda m: None)
    assert max(RunDir(tmp_path / "lab").export_paths()) > max(run.export_paths())


def test_a_tags_run_samples_the_tags_asked_for(tmp_path):
    from ddpm_tf.train import train

    images = tmp_path / "images"
    for i, (value, tags) in enumerate([(200, "Smile, glasses"), (190, "smile"), (50, "frown, glasses"),
                                       (60, "frown"), (120, "rare_one")]):
        class_images(images, value, count=1, seed=i)
        (images / "0.png").rename(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(tags, encoding="utf-8")
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(tmp_path / "run")},
                                             "data": {"dir": str(images), "labels": "tags",
                                                      "near_duplicate_threshold": -1},
                                             "train": {"epochs": 1}})
    train(load_config(cfg), echo=lambda m: None, log=lambda m: None)
    saved = RunDir(tmp_path / "run").load_labels()
    assert saved.mode == "tags" and set(saved.names) == {"smile", "glasses", "frown"}  # rare one: 1 image
    result = invoke("sample", "--run", tmp_path / "run", "--tags", "SMILE,  Glasses", "--n", 1, "--sampler", "ddim",
                    "--steps", 3, "--out", tmp_path / "s.png")
    assert result.exit_code == 0, result.output
    meta = read_png_metadata(tmp_path / "s" / "0000-smile+glasses-seed0.png")
    assert meta["ddpm_tf:tags"] == "smile, glasses"
    result = invoke("sample", "--run", tmp_path / "run", "--tags", " , ")
    assert result.exit_code == 2 and "no tag given" in result.output
    result = invoke("sample", "--run", tmp_path / "run", "--class", "smile")
    assert result.exit_code == 2 and "labels are tags" in result.output


@pytest.fixture(scope="module")
def mean_features(tmp_path_factory):
    """A feature network that is each channel's mean brightness (no weights): bright and dark apart by
    construction, so the probe's held-out accuracy is known to be 1."""
    from ddpm_tf.compat import keras

    inputs = keras.Input((16, 16, 3))
    path = tmp_path_factory.mktemp("features") / "mean.h5"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(str(path))
    return path


def eval_rows(run_dir):
    with open(run_dir / "eval.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_per_class_eval_sweeps_guidance_and_scores_each_class(run_copy, mean_features):
    result = invoke("eval", "--run", run_copy, "--features", mean_features, "--guidance", "0,3", "--n", 4,
                    "--sampler", "ddim:3", "--set", "eval.kid_subset_size=3", "--memorization")
    assert result.exit_code == 0, result.output
    rows = eval_rows(run_copy)
    assert [(float(r["guidance"]), r["class"]) for r in rows] == [
        (0, "bright"), (0, "dark"), (0, "(all)"), (3, "bright"), (3, "dark"), (3, "(all)")]
    assert {r["source"] for r in rows} == {"ddim-3-eta1"} and {r["features"] for r in rows} == {"model:mean.h5"}
    assert [(r["n"], r["n_train"]) for r in rows[:3]] == [("4", "4"), ("4", "4"), ("8", "8")]
    assert {float(r["probe_held_out_accuracy"]) for r in rows} == {1.0}
    for point in (rows[:3], rows[3:]):
        accuracy = [float(r["class_accuracy"]) for r in point]
        assert all(a in (0, 0.25, 0.5, 0.75, 1) for a in accuracy[:2])  # 4 samples a class
        assert accuracy[2] == pytest.approx(np.mean(accuracy[:2]))  # the summary: every sample
        assert all(np.isfinite(float(r["kid_mean"])) and 0 <= float(r["near_copy_share"]) <= 1 for r in point)
        # eval.csv writes 6 significant digits: the mean of two rounded values is within 1e-5 of the rounded mean.
        assert float(point[2]["mean_class_kid"]) == pytest.approx(
            np.mean([float(r["kid_mean"]) for r in point[:2]]), rel=1e-5, abs=1e-6)
    assert "on real images it did not see it gets 100.0 % right" in result.output
    assert "ddim-3-eta1" in result.output.split("per-class eval of", 1)[1]


def test_per_class_eval_refuses_what_it_cannot_score(run_copy, mean_features, tmp_path):
    unknown = invoke("eval", "--run", run_copy, "--features", mean_features, "--class", "brigth")
    assert unknown.exit_code == 2 and "brigth" in unknown.output and "bright" in unknown.output
    negative = invoke("eval", "--run", run_copy, "--guidance", "1,-1")
    assert negative.exit_code == 2 and "-1" in negative.output
    folder = tmp_path / "pngs"
    class_images(folder, 100)
    with_images = invoke("eval", "--run", run_copy, "--per-class", "--images", folder)
    assert with_images.exit_code != 0 and "--images: a folder has no classes" in with_images.output
    assert not (run_copy / "eval.csv").exists()


def test_training_eval_on_a_labelled_run_scores_its_class_accuracy(labelled, run_copy, mean_features, tmp_path):
    cfg = yaml.safe_load(labelled[0].read_text(encoding="utf-8"))
    cfg["run"]["dir"] = str(run_copy)
    cfg["train"].update({"epochs": 2, "eval_every": 1})
    cfg["eval"] = {"features": str(mean_features), "n": 4, "steps": 2, "kid_subset_size": 3}
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = invoke("train", "--config", tmp_path / "more.yaml")
    assert result.exit_code == 0, result.output
    (row,) = eval_rows(run_copy)
    assert row["epoch"] == "2" and float(row["probe_held_out_accuracy"]) == 1.0
    assert float(row["class_accuracy"]) in (0, 0.25, 0.5, 0.75, 1)
