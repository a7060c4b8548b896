"""The CLI end to end: train -> checkpoints -> sample -> PNGs, resume, and clean config errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.images import read_png_metadata


def tensorboard_tags(folder):
    from ddpm_tf.compat import tf

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_train_then_sample(tiny_project, tmp_path):
    cfg, run_dir = tiny_project
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "exports").iterdir()) == ["ema-00000002.npz", "ema-00000004.npz"]
    assert (run_dir / "checkpoints" / "checkpoint").is_file()
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["2", "4"]
    with Image.open(run_dir / "previews" / "latest.png") as im:
        assert im.size == (2 * 18 + 2, 18 + 2)  # 2 previews of 16 px in a 1x2 grid, 2 px padding
    assert tensorboard_tags(run_dir / "tensorboard") >= {"loss", "learning_rate", "images_per_s", "ema_decay",
                                                         "preview"}

    out = tmp_path / "grid.png"
    result = invoke("sample", "--run", run_dir, "--n", 4, "--seed", 9, "--out", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (38, 38) and im.mode == "RGB"
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in singles] == [f"{i:04d}-seed{9 + i}.png" for i in range(4)]
    with Image.open(singles[0]) as im:
        assert im.size == (16, 16)
        first = np.asarray(im)
    meta = read_png_metadata(singles[0])
    assert meta["ddpm_tf:seed"] == "9" and meta["ddpm_tf:sampler"] == "ddpm" and meta["ddpm_tf:step"] == "4"

    # The same seed gives the same images, here via the newest run under --runs-root, batch 3.
    out2 = tmp_path / "again.png"
    result = invoke("sample", "--runs-root", run_dir.parent, "--n", 2, "--seed", 9, "--batch-size", 3, "--out", out2)
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "again" / "0000-seed9.png") as im:
        assert np.abs(np.asarray(im).astype(int) - first).max() <= 1


def test_resume_continues_and_refuses_a_different_network(tiny_project):
    cfg, run_dir = tiny_project
    assert invoke("train", "--config", cfg, "--set", "train.epochs=1").exit_code == 0
    result = invoke("train", "--config", cfg, "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "from step 2 (epoch 1)" in result.output
    with open(run_dir / "metrics.csv", encoding="utf-8") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "4"]
    result = invoke("train", "--config", cfg, "--set", "train.epochs=3", "--set", "model.base_channels=32")
    assert result.exit_code == 2
    assert "model.base_channels" in result.output and "--restart" in result.output
    # Nothing was lost: the run still holds its step-4 export.
    assert (run_dir / "exports" / "ema-00000004.npz").is_file()


@pytest.mark.parametrize("overrides, needle", [
    (["train.batch_size=0"], "train.batch_size"),
    (["train.ema_decay=x"], "train.ema_decay"),
    (["model.widths=[1]"], "model.widths"),
])
def test_config_errors_exit_2_naming_the_key(tiny_project, overrides, needle):
    cfg, run_dir = tiny_project
    args = ["train", "--config", cfg]
    for o in overrides:
        args += ["--set", o]
    result = invoke(*args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not run_dir.exists()  # checked before any work


def test_bad_config_file_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  image_size: -5\n", encoding="utf-8")
    result = invoke("train", "--config", path)
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "data.image_size" in result.output


def test_sample_without_runs_is_a_clear_error(tmp_path):
    result = invoke("sample", "--runs-root", tmp_path / "none")
    assert result.exit_code == 1
    assert "no run found" in result.output


def test_empty_data_folder_is_a_clear_error(tmp_path):
    from conftest import write_config

    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(tmp_path / "run")},
                                             "data": {"dir": str(tmp_path / "empty")}})
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 1
    assert "no usable image" in result.output and "empty" in result.output


def test_help_shows_defaults_and_examples():
    for command in ("train", "sample"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output
    assert "default: runs" in invoke("sample", "--help").output
