"""What the Generate and img2img tabs do: the page's requests turned into the generation engine's calls
(generation.py, the same code as `ddpm sample`), with each (run, checkpoint) loaded once and kept, and the
labels a run offers read without loading it. TensorFlow is imported on the first generation only."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from ..errors import ConfigError
from ..images import read_png_metadata
from ..runs import RunDir
from ..samplers import SAMPLERS
from ..seeds import SEED_MAX, check_seed_range, parse_seeds
from .roots import Roots

KEEP_LOADED = 2  # runs kept in memory: a 64x64 run's EMA network is ~100 MB


class Bar:
    """A progress bar for `sample_seeds` that reports to Gradio's gr.Progress (or any callable)."""

    def __init__(self, report, total: int, desc: str | None = None):
        self.report, self.total, self.done, self.desc = report, total, 0, desc or "sampling"

    def update(self, n: int = 1) -> None:
        self.done += n
        self.report((self.done, self.total), desc=self.desc, unit="steps")

    def close(self) -> None:
        pass


def seed_of(path) -> int:
    """The seed a generated PNG records (for "reuse this seed"); ConfigError for a PNG without one."""
    try:
        return int(read_png_metadata(Path(path))["ddpm_tf:seed"])
    except (OSError, KeyError, ValueError):
        raise ConfigError(f"{Path(str(path)).name}: no ddpm_tf:seed in this image's metadata") from None


def label_choices(run_path: Path) -> tuple[str | None, list[str]]:
    """(mode, names) of a run's labels: ('folders', classes), ('tags', vocabulary) or (None, [])."""
    label_set = RunDir(run_path).load_labels()
    return (label_set.mode, list(label_set.names)) if label_set else (None, [])


def conditions(class_name: str | None, tags: str | None, guidance: float | None, labelled: bool) -> dict:
    """The engine's classes/tags/guidance arguments for the page's controls (shown only on a run with labels)."""
    if not labelled:
        return {}
    return {"classes": [class_name] if class_name else [], "tags": [tags] if (tags or "").strip() else [],
            "guidance": None if guidance is None else float(guidance)}


class Studio:
    """Generation for the page: runs loaded once per (run, checkpoint), the newest KEEP_LOADED kept."""

    def __init__(self, roots: Roots, keep: int = KEEP_LOADED):
        self.roots, self.keep = roots, keep
        self._loaded: OrderedDict = OrderedDict()

    def loaded(self, run_name: str, checkpoint=None):
        """The LoadedRun of a run of the runs folder at a checkpoint (None or '': the newest)."""
        from ..generation import LoadedRun

        run_path = self.roots.run(run_name)
        checkpoint = int(checkpoint) if checkpoint not in (None, "") else None
        key = (run_path, checkpoint)
        if key not in self._loaded:
            self._loaded[key] = LoadedRun.load(run_path, checkpoint=checkpoint)
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]

    @staticmethod
    def _sampler_options(sampler: str | None, steps, eta) -> dict:
        options = {"sampler": sampler or None, "steps": int(steps) if steps else None}
        if sampler and "eta" in SAMPLERS[sampler].options and eta is not None:
            options["eta"] = float(eta)
        return options

    def generate(self, run_name: str, checkpoint=None, *, sampler=None, steps=None, eta=None, seeds_text="",
                 first_seed=0, n=4, labels: dict | None = None, progress=None, echo=lambda msg: None):
        """(grid path, per-image paths) of one Generate click: `seeds_text` ('17, 42') or n seeds from
        `first_seed`, written under the run's samples/ like `ddpm sample` does."""
        from ..generation import generate, images_of

        seeds = parse_seeds(seeds_text) if (seeds_text or "").strip() else None
        if seeds is None:
            if not 0 <= int(first_seed) <= SEED_MAX:
                raise ConfigError(f"first seed {first_seed}: expected 0..{SEED_MAX}")
            check_seed_range(int(first_seed), int(n), "--seed", "--n")
            seeds = list(range(int(first_seed), int(first_seed) + int(n)))
        loaded = self.loaded(run_name, checkpoint)
        factory = (lambda total, desc=None: Bar(progress, total, desc)) if progress is not None else None
        grid = generate(loaded, seeds=seeds, **self._sampler_options(sampler, steps, eta), **(labels or {}),
                        echo=echo, progress_factory=factory)
        return grid, images_of(grid)

    def img2img(self, run_name: str, checkpoint, image: Path, *, source_name: str, strength=0.5, seed=0,
                steps=None, labels: dict | None = None, echo=lambda msg: None) -> tuple[Path, Path]:
        """(result, before/after pair) of an image: an upload (a temporary file) or a path under the roots."""
        from ..generation import img2img

        out = img2img(self.loaded(run_name, checkpoint), Path(image), strength=float(strength), seed=int(seed),
                      steps=int(steps) if steps else None, source_name=source_name, **(labels or {}), echo=echo)
        return out, out.with_name(out.stem + "-pair.png")

    def interpolate(self, run_name: str, checkpoint, seed_a, seed_b, *, frames=8, steps=None,
                    labels: dict | None = None, echo=lambda msg: None) -> tuple[Path, Path]:
        """(strip PNG, animated GIF) between two seeds."""
        from ..generation import interpolate

        for value in (seed_a, seed_b):
            if not 0 <= int(value) <= SEED_MAX:
                raise ConfigError(f"seed {value}: expected 0..{SEED_MAX}")
        out = interpolate(self.loaded(run_name, checkpoint), int(seed_a), int(seed_b), frames=int(frames),
                          steps=int(steps) if steps else None, **(labels or {}), echo=echo)
        return out, out.with_suffix(".gif")
