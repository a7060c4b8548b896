"""`ddpm sample`, `ddpm interpolate` and `ddpm img2img`, orchestration only: run dir -> the run loaded once
(generation.LoadedRun: saved config, EMA network) -> the generation engine -> PNGs. Only the CLI imports this
module; the web page calls the same engine with runs it keeps loaded."""

from __future__ import annotations

from pathlib import Path

from . import generation
from .generation import LoadedRun


def sample(run_dir: Path | None = None, *, runs_root: Path = Path("runs"), checkpoint: int | None = None,
           **request) -> Path:
    """Generate images from a run's EMA weights (generation.generate); returns the grid's path."""
    return generation.generate(LoadedRun.load(run_dir, runs_root, checkpoint), **request)


def interpolate(run_dir: Path | None, seed_a: int, seed_b: int, *, runs_root: Path = Path("runs"),
                checkpoint: int | None = None, **request) -> Path:
    """A morph strip and GIF between two seeds (generation.interpolate); returns the strip's path."""
    return generation.interpolate(LoadedRun.load(run_dir, runs_root, checkpoint), seed_a, seed_b, **request)


def img2img(run_dir: Path | None, image: Path, *, runs_root: Path = Path("runs"), checkpoint: int | None = None,
            **request) -> Path:
    """SDEdit of one image (generation.img2img); returns the result's path."""
    return generation.img2img(LoadedRun.load(run_dir, runs_root, checkpoint), image, **request)
