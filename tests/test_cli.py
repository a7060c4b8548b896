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


# --- numbers and parsing (issue 11, section 5): refused before any run is read -------------------------

SEED_MAX = 2**31 - 1  # the int32 seeds of the stateless TF generators (ddpm_tf.seeds.SEED_MAX)

def test_every_float_option_refuses_nan_and_inf():
    import click

    from ddpm_tf.cli import FiniteFloat

    floats = [(name, p.name) for name, cmd in main.commands.items() for p in cmd.params
              if isinstance(p.type, click.types.FloatParamType)]
    assert ("sample", "eta") in floats and ("img2img", "strength") in floats
    for name, param in floats:
        option = next(p for p in main.commands[name].params if p.name == param)
        assert isinstance(option.type, FiniteFloat), f"ddpm {name} --{param} is not a FiniteFloat"


@pytest.mark.parametrize("command, option", [("sample", "--eta"), ("eval", "--eta"), ("img2img", "--strength")])
@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-inf", "1e999"])
def test_float_options_refuse_non_finite_values(tmp_path, command, option, value):
    # Before: --eta nan wrote black images and --strength nan ran zero steps, exit 0. Here no run exists,
    # so a value that got through would end in "no run found" (exit 1) instead.
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(image)
    args = [command, *([image] if command == "img2img" else []), "--runs-root", tmp_path / "none", option, value]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert option in result.output and "not a finite number" in result.output


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_seed_plus_n_beyond_the_seed_range_is_refused_before_any_work(tmp_path, command):
    # Before: `ddpm sample --seed 2147483647 --n 2` wrote an image with seed 2147483648, which --seeds refuses.
    result = invoke(command, "--runs-root", tmp_path / "none", "--seed", SEED_MAX, "--n", 2)
    assert result.exit_code == 2, result.output
    assert f"--seed {SEED_MAX} with --n 2" in result.output and f"0..{SEED_MAX}" in result.output
    # The last seed exactly at the bound is fine: this gets as far as looking for a run.
    result = invoke(command, "--runs-root", tmp_path / "none", "--seed", SEED_MAX - 1, "--n", 2)
    assert result.exit_code == 1 and "no run found" in result.output


@pytest.mark.parametrize("args", [["sample", "--seeds", "2147483648"], ["interpolate", "--seeds", 0, 2**31],
                                  ["img2img", "IMAGE", "--seed", 2**31], ["sample", "--seed", 2**31],
                                  ["eval", "--seed", 2**31]])
def test_every_seed_option_has_the_same_range(tmp_path, args):
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(image)
    args = [image if a == "IMAGE" else a for a in args]
    result = invoke(*args, "--runs-root", tmp_path / "none")
    assert result.exit_code == 2 and "2147483647" in result.output, result.output


@pytest.fixture
def fixture_run(tmp_path):
    """A copy of the small exported run of test_sample_cli, its sample.seed and eval.seed at the top of the range."""
    import shutil
    from pathlib import Path

    import yaml

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "export-keras3", run)
    body = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    body["sample"].update(seed=SEED_MAX - 3, n=4)  # the last seed is exactly SEED_MAX
    body.setdefault("eval", {}).update(seed=SEED_MAX - 3, n=4)
    (run / "config.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return run


def test_seed_or_n_from_the_run_config_is_checked_before_sampling(fixture_run, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke("sample", "--run", fixture_run, "--n", 5, "--sampler", "ddim", "--steps", 1, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"sample.seed = {SEED_MAX - 3} with --n 5" in result.output and str(SEED_MAX + 1) in result.output
    result = invoke("sample", "--run", fixture_run, "--seed", SEED_MAX, "--sampler", "ddim", "--steps", 1,
                    "--out", out)
    assert result.exit_code == 2, result.output
    assert f"--seed {SEED_MAX} with sample.n = 4" in result.output
    assert not out.exists() and not (tmp_path / "grid").exists()  # refused before sampling
    # eval: refused before the feature network is even looked for.
    result = invoke("eval", "--run", fixture_run, "--n", 5, "--features", tmp_path / "missing.h5")
    assert result.exit_code == 2 and f"eval.seed = {SEED_MAX - 3} with --n 5" in result.output, result.output
    result = invoke("eval", "--run", fixture_run, "--set", "eval.n=5", "--features", tmp_path / "missing.h5")
    assert result.exit_code == 2 and "--set" in result.output and "eval.n = 5" in result.output, result.output


def test_set_that_breaks_a_cross_key_check_is_named(tiny_project):
    cfg, run_dir = tiny_project
    result = invoke("train", "--config", cfg, "--set", "model.norm_groups=5")
    assert result.exit_code == 2
    assert "Error: --set: model.norm_groups = 5 does not divide" in result.output and cfg.name not in result.output
    assert not run_dir.exists()


def test_config_file_that_expands_is_refused_in_one_short_line(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text("eval:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcd", "bcde")) +
        "run:\n  dir: [" + ", ".join(["*e"] * 9) + "]\n", encoding="utf-8")
    result = invoke("train", "--config", path)
    assert result.exit_code == 2
    assert "laughs.yaml" in result.output and "alias" in result.output and len(result.output) < 400
