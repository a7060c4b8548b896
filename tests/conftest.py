"""Shared fixtures: tiny configs (16x16 images, widths 16/32) so the suite runs on a 2-core CPU in minutes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = {
    "run": {"checkpoint_every": 1, "preview_every": 1, "preview_n": 2},
    "data": {"image_size": 16, "channels": 3},
    "model": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
              "attention_heads": 1, "dropout": 0.0, "norm_groups": 8},
    "diffusion": {"timesteps": 50},
    "train": {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "seed": 3},
    "sample": {"n": 4, "batch_size": 4},
}


def write_images(folder: Path, count: int, size=(24, 20), seed: int = 0) -> list[Path]:
    """`count` random RGB PNGs of `size` (w, h) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def write_config(path: Path, overrides: dict) -> Path:
    """TINY merged with `overrides` ({section: {key: value}}), written as YAML; the data cache beside it."""
    body = {section: dict(values) for section, values in TINY.items()}
    for section, values in overrides.items():
        body.setdefault(section, {}).update(values)
    body["data"].setdefault("cache", str(path.parent / "data-cache"))  # not data/cache under the repository
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


@pytest.fixture
def tiny_project(tmp_path):
    """(config path, run dir) of a tiny project with 6 generated images."""
    images = tmp_path / "images"
    write_images(images, 6)
    run_dir = tmp_path / "runs" / "tiny"
    cfg = write_config(tmp_path / "tiny.yaml", {"run": {"dir": str(run_dir)}, "data": {"dir": str(images)}})
    return cfg, run_dir
