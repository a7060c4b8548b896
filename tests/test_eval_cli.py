"""`ddpm eval` and `train.eval_every` end to end, with a small injected feature network (never the internet)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import write_config, write_images
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.compat import keras

FIXTURE = Path(__file__).parent / "fixtures" / "export-keras3"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def features_file(tmp_path):
    """A seeded random conv net saved as a whole Keras model (.h5: both Keras lines read it)."""
    init = [keras.initializers.GlorotUniform(seed=i) for i in range(2)]
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init[0])(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu", kernel_initializer=init[1])(x)
    path = tmp_path / "tiny-features.h5"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(str(path))
    return path


@pytest.fixture
def run_with_data(tmp_path):
    """The committed fixture run, its config pointed at a folder of 12 training images."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    images = tmp_path / "train-images"
    write_images(images, 12, size=(16, 16), seed=5)
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["dir"] = str(images)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return run, images


def test_eval_generates_scores_and_reports_memorization(run_with_data, features_file):
    run, train_images = run_with_data
    result = invoke("eval", "--run", run, "--features", features_file, "--n", 8, "--steps", 4, "--memorization",
                    "--set", "eval.kid_subset_size=5")
    assert result.exit_code == 0, result.output
    assert "KID" in result.output and "near-copies of training images: 0 of 8" in result.output
    generated = rows(run / "eval.csv")[-1]
    assert generated["step"] == "3" and generated["source"] == "ddim-4-eta1" and generated["n"] == "8"
    assert generated["n_train"] == "12" and generated["features"] == "model:tiny-features.h5"
    assert generated["kid_subset_size"] == "5" and float(generated["kid_std"]) > 0
    assert np.isfinite(float(generated["kid_mean"])) and float(generated["fid"]) > 0
    pairs = list((run / "eval").glob("closest-pairs-*.png"))
    assert len(pairs) == 1
    with Image.open(pairs[0]) as im:
        im.load()
        assert im.size[0] > 16 and im.size[1] >= 16
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # The training images themselves, scored as if they were samples: every one a near-copy.
    result = invoke("eval", "--run", run, "--features", features_file, "--images", train_images, "--memorization")
    assert result.exit_code == 0, result.output
    itself = rows(run / "eval.csv")[-1]
    assert itself["source"] == f"folder:{train_images}" and float(itself["near_copy_share"]) == 1.0
    assert "near-copies of training images: 12 of 12" in result.output


def test_eval_with_a_missing_features_file_names_it(run_with_data, tmp_path):
    run, _ = run_with_data
    result = invoke("eval", "--run", run, "--set", "train.epochs=3")
    assert result.exit_code == 2 and "only overrides eval.* keys" in result.output
    result = invoke("eval", "--run", run, "--features", tmp_path / "nowhere.h5", "--n", 4)
    assert result.exit_code == 1
    assert "nowhere.h5: no such file" in result.output and "Traceback" not in result.output
    assert not (run / "eval.csv").exists()


def test_train_eval_every_appends_a_row_per_epoch(tiny_project, features_file):
    cfg_path, run_dir = tiny_project
    overrides = ["--set", "train.eval_every=1", "--set", f"eval.features={features_file}", "--set", "eval.n=4",
                 "--set", "eval.steps=3"]
    result = invoke("train", "--config", cfg_path, *overrides)
    assert result.exit_code == 0, result.output
    table = rows(run_dir / "eval.csv")
    assert [r["epoch"] for r in table] == ["1", "2"] and [r["source"] for r in table] == ["ddim-3-eta1"] * 2
    assert all(np.isfinite(float(r["kid_mean"])) for r in table)
    assert "epoch 2: KID" in result.output


def test_the_memorisation_curve_is_drawn_and_the_best_export_kept(tiny_project, features_file):
    """train.eval_every: every evaluated step gets its export (checkpoint_every is not a divisor here), the one
    with the lowest KID outlives keep_last, RUN/eval/curve.png is redrawn, the log names the best step."""
    from ddpm_tf.runs import RunDir

    cfg_path, run_dir = tiny_project
    overrides = ["--set", "train.eval_every=1", "--set", "train.epochs=3", "--set", "run.checkpoint_every=5",
                 "--set", "run.keep_last=1", "--set", f"eval.features={features_file}", "--set", "eval.n=4",
                 "--set", "eval.steps=3"]
    result = invoke("train", "--config", cfg_path, *overrides)
    assert result.exit_code == 0, result.output
    table = rows(run_dir / "eval.csv")
    steps = [int(r["step"]) for r in table]
    assert steps == [2, 4, 6]
    kid = {int(r["step"]): float(r["kid_mean"]) for r in table}
    best_of_first_two = min((2, 4), key=lambda s: (kid[s], s))  # what the last save knew
    assert sorted(RunDir(run_dir).export_paths()) == sorted({best_of_first_two, 6})
    best = min(steps, key=lambda s: (kid[s], s))
    assert f"lowest KID so far at step {best} ({kid[best]:.4f})" in result.output
    with Image.open(run_dir / "eval" / "curve.png") as im:
        assert im.size == (640, 488) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert (np.all(pixels == (31, 119, 180), axis=-1)).sum() > 50  # the KID line and points
    assert (np.all(pixels == (44, 160, 44), axis=-1)).sum() > 100  # the best step marked in both panels


def test_curve_points_from_eval_csv(tmp_path):
    from ddpm_tf.evaluation import curve
    from ddpm_tf.runs import append_csv_row

    path = tmp_path / "eval.csv"
    for row in [{"step": 100, "epoch": 1, "kid_mean": 0.5, "kid_std": 0.1, "near_copy_share": 0},
                {"step": 200, "epoch": "", "kid_mean": 0.01, "kid_std": 0.1, "near_copy_share": 0},  # `ddpm eval`
                {"step": 200, "epoch": 2, "kid_mean": 0.2, "kid_std": 0.05, "near_copy_share": 0.0},
                {"step": 300, "epoch": 3, "kid_mean": "nan?", "kid_std": 0, "near_copy_share": 0},  # unreadable
                {"step": 400, "epoch": 4, "kid_mean": 0.3, "kid_std": 0.05, "near_copy_share": 0.25},
                {"step": 100, "epoch": 1, "kid_mean": 0.4, "kid_std": 0.1, "near_copy_share": 0}]:  # re-evaluated
        append_csv_row(path, row)
    points = curve.training_points(path)
    assert [(p.step, p.kid, p.near_copies) for p in points] == [(100, 0.4, 0), (200, 0.2, 0), (400, 0.3, 0.25)]
    assert curve.best(points).step == 200 and curve.best([]) is None
    assert curve.summary(points) == "lowest KID so far at step 200 (0.2000); near-copies since step 400"
    assert curve.training_points(tmp_path / "missing.csv") == []


def test_train_eval_every_without_features_stops_before_training(tmp_path):
    images = tmp_path / "images"
    write_images(images, 6)
    run_dir = tmp_path / "runs" / "tiny"
    cfg = write_config(tmp_path / "tiny.yaml", {"run": {"dir": str(run_dir)}, "data": {"dir": str(images)},
                                                "train": {"eval_every": 1},
                                                "eval": {"features": str(tmp_path / "missing.h5")}})
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 1 and "missing.h5: no such file" in result.output
    assert not list(run_dir.glob("checkpoints/ckpt-*"))
