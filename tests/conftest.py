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


def class_images(folder: Path, value: int, count: int = 4, seed: int = 0) -> None:
    """`count` distinct noisy 20x20 RGB images around grey level `value` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = np.clip(value + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


def ui_project(root: Path, epochs: int = 2) -> dict:
    """The folders of `ddpm ui` tests under `root`: images in two class folders (bright, dark), a tiny config
    in configs/ (data.max_pixels 1000: a 64x64 upload is a decompression bomb to it), and runs/tiny trained
    for `epochs` epochs of 2 steps (a preview and a metrics.csv row each)."""
    from ddpm_tf.config import load_config
    from ddpm_tf.train import train

    class_images(root / "images" / "bright", 210, seed=1)
    class_images(root / "images" / "dark", 40, seed=2)
    (root / "configs").mkdir()
    config = write_config(root / "configs" / "tiny.yaml", {
        "run": {"dir": str(root / "runs" / "tiny")},
        "data": {"dir": str(root / "images"), "labels": "folders", "min_class_images": 2,
                 "near_duplicate_threshold": -1, "max_pixels": 1000, "cache": str(root / "cache")},
        "train": {"epochs": epochs}, "sample": {"sampler": "ddim", "steps": 5}})
    train(load_config(config), echo=lambda m: None, log=lambda m: None)
    return {"root": root, "runs": root / "runs", "configs": root / "configs", "config": config,
            "run": root / "runs" / "tiny", "images": root / "images"}
