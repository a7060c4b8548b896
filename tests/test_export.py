"""EMA exports are portable: a run exported on TF 2.10 (Keras 2) samples on the newest TF (Keras 3) and back."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.compat import tf
from ddpm_tf.errors import RunError
from ddpm_tf.runs import RunDir, load_weights, save_weights
from ddpm_tf.unet import build_unet

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_export_fixture import fixed_input  # noqa: E402


@pytest.mark.parametrize("line", ["export-keras2", "export-keras3"])
def test_fixture_loads_and_computes_the_same_outputs(line):
    run = RunDir(FIXTURES / line)
    cfg = run.load_config()
    net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels, name="ema_unet")
    step, path = run.latest_export()
    meta = load_weights(net, path)
    assert step == 3 and meta["keras"].startswith("2." if line.endswith("2") else "3.")
    x, t = fixed_input()
    y = net([tf.constant(x), tf.constant(t)]).numpy()
    expected = np.load(FIXTURES / line / "expected_output.npy")
    assert np.abs(expected).mean() > 0.01  # a non-trivial network
    assert np.allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("line", ["export-keras2", "export-keras3"])
def test_fixture_samples_through_the_cli(line, tmp_path):
    run_dir = tmp_path / line
    shutil.copytree(FIXTURES / line, run_dir)
    result = CliRunner().invoke(main, ["sample", "--run", str(run_dir), "--n", "2", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "g" / "0001-seed1.png") as im:
        assert im.size == (16, 16)


def test_export_round_trip_and_mismatch_errors(tmp_path):
    run = RunDir(FIXTURES / "export-keras3")
    cfg = run.load_config()
    net = build_unet(cfg.model, 16, 3, name="ema_unet")
    load_weights(net, run.latest_export()[1])
    save_weights(net, tmp_path / "w.npz", {"note": "x"})
    other = build_unet(cfg.model, 16, 3, name="ema_unet")
    assert load_weights(other, tmp_path / "w.npz") == {"note": "x"}
    for a, b in zip(net.weights, other.weights):
        assert np.array_equal(a.numpy(), b.numpy())
    wider = build_unet(dataclasses.replace(cfg.model, base_channels=16), 16, 3, name="ema_unet")
    with pytest.raises(RunError, match="has shape"):
        load_weights(wider, tmp_path / "w.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(RunError, match="not a readable weights export"):
        load_weights(other, tmp_path / "broken.npz")
    with pytest.raises(RunError, match="no checkpoint at step 7"):
        run.latest_export(7)
