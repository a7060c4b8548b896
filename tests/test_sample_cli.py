"""Sampling commands on a small fixture run: samplers, --seeds, interpolate, img2img, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.images import read_png_metadata

FIXTURE = Path(__file__).parent / "fixtures" / "export-keras3"


@pytest.fixture
def run_dir(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    return tmp_path / "run"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im).astype(int)


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("dpmpp_2m", 4), ("ddpm", None)])
def test_samplers_and_seeds_regenerate_the_same_images(run_dir, tmp_path, sampler, steps):
    extra = ["--steps", steps] if steps else []
    result = invoke("sample", "--run", run_dir, "--n", 3, "--seed", 40, "--sampler", sampler, *extra,
                    "--out", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    meta = read_png_metadata(tmp_path / "a" / "0002-seed42.png")
    assert meta["ddpm_tf:sampler"] == sampler and meta["ddpm_tf:seed"] == "42"
    assert meta["ddpm_tf:steps"] == str(steps or 20)
    result = invoke("sample", "--run", run_dir, "--seeds", "42,7", "--sampler", sampler, *extra,
                    "--batch-size", 1, "--out", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert np.abs(pixels(tmp_path / "b" / "0000-seed42.png") - pixels(tmp_path / "a" / "0002-seed42.png")).max() <= 1
    assert read_png_metadata(tmp_path / "b.png")["ddpm_tf:seeds"] == "42,7"


def test_interpolate_writes_a_strip_and_a_gif(run_dir, tmp_path):
    out = tmp_path / "morph.png"
    result = invoke("interpolate", "--run", run_dir, "--seeds", 3, 9, "--frames", 5, "--steps", 4, "--out", out)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (5 * 18 + 2, 18 + 2)
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 8  # 5 forward, 3 back (ping-pong loop)
    strip = pixels(out)
    # The ends are the two seeds' own DDIM images.
    result = invoke("sample", "--run", run_dir, "--seeds", "3,9", "--sampler", "ddim", "--steps", 4,
                    "--eta", 0, "--out", tmp_path / "ends.png")
    assert result.exit_code == 0
    first = pixels(tmp_path / "ends" / "0000-seed3.png")
    assert np.abs(strip[2:18, 2:18] - first).max() <= 2


def test_img2img_strength(run_dir, tmp_path):
    source = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(source)
    result = invoke("img2img", source, "--run", run_dir, "--strength", 0, "--out", tmp_path / "same.png")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "same.png"), pixels(source))  # strength 0: unchanged
    result = invoke("img2img", source, "--run", run_dir, "--strength", 0.6, "--steps", 10,
                    "--out", tmp_path / "edit.png")
    assert result.exit_code == 0, result.output
    assert "6 of 10 DDIM steps" in result.output
    assert not np.array_equal(pixels(tmp_path / "edit.png"), pixels(source))
    assert (tmp_path / "edit-pair.png").is_file()


@pytest.mark.parametrize("args, code, needle", [
    (["--steps", 21], 1, "steps must be in 1..20"),
    (["--sampler", "euler"], 2, "euler"),
    (["--eta", 1.5], 2, "1.5"),
    (["--sampler", "ddpm", "--eta", 0.5], 2, "the ddpm sampler takes no eta"),
    (["--seeds", "1,x"], 2, "comma-separated"),
])
def test_bad_sampling_options(run_dir, args, code, needle):
    result = invoke("sample", "--run", run_dir, *args)
    assert result.exit_code == code
    assert needle in result.output and "Traceback" not in result.output


def test_img2img_bad_image(run_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image", encoding="utf-8")
    result = invoke("img2img", bad, "--run", run_dir)
    assert result.exit_code == 1 and "bad.png" in result.output


def test_img2img_applies_the_runs_data_guards(run_dir, tmp_path):
    # The same checks and reasons as ddpm prepare: data.max_pixels from the header, data.min_side (16 here).
    config = run_dir / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("min_side: 16,", "min_side: 16, max_pixels: 300,"),
                      encoding="utf-8")
    rng = np.random.default_rng(0)
    for name, side in (("small.png", 12), ("big.png", 20), ("fine.png", 16)):
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
    result = invoke("img2img", tmp_path / "small.png", "--run", run_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "small.png: cannot use this image: too-small (12x12, data.min_side is 16)" in result.output
    result = invoke("img2img", tmp_path / "big.png", "--run", run_dir)
    assert result.exit_code == 1 and "decompression-bomb (20x20 is more than data.max_pixels = 300)" in result.output
    result = invoke("img2img", tmp_path / "fine.png", "--run", run_dir, "--strength", 0, "--out", tmp_path / "o.png")
    assert result.exit_code == 0, result.output


def test_a_run_without_weights_is_a_clear_error(run_dir):
    for p in (run_dir / "exports").iterdir():
        p.unlink()
    result = invoke("sample", "--run", run_dir)
    assert result.exit_code == 1 and "no exported weights yet" in result.output


def test_batches_that_do_not_fit_are_split(run_dir, tmp_path, monkeypatch):
    from ddpm_tf import samplers
    from ddpm_tf.compat import tf

    real_call = samplers.Sampler.__call__
    sizes = []

    def limited(self, seeds, image_shape, **kwargs):
        sizes.append(len(seeds))
        if len(seeds) > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return real_call(self, seeds, image_shape, **kwargs)

    monkeypatch.setattr(samplers.Sampler, "__call__", limited)
    result = invoke("sample", "--run", run_dir, "--n", 5, "--batch-size", 8, "--sampler", "ddim", "--steps", 2,
                    "--out", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    assert "retrying with batches of 4" in result.output and "retrying with batches of 2" in result.output
    assert sizes == [5, 4, 2, 2, 1] and len(list((tmp_path / "g").glob("*.png"))) == 5
