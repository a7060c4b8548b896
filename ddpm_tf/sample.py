"""Sampling orchestration: run dir -> saved config -> network with EMA weights -> compiled sampler -> PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .compat import tf
from .images import make_grid, save_png, to_uint8
from .precision import apply_policy, use_xla
from .runs import RunDir, find_latest_run, load_weights
from .samplers import SAMPLERS, initial_noise
from .schedule import Schedule
from .unet import build_unet


class Sampler:
    """A compiled reverse loop for one network and schedule.

    The loop runs in chunks of `chunk` steps, each chunk one call of a single `tf.function` (traced
    once per batch shape), so Python does one call per chunk and the progress bar still moves.
    """

    def __init__(self, net, schedule, name: str = "ddpm", steps: int | None = None, *, variance: str = "small",
                 clip_x0: bool = True, eta: float = 0.0, jit_compile: bool = False, chunks: int = 20):
        fn, timesteps_fn = SAMPLERS[name]
        self.timesteps = timesteps_fn(schedule, steps)
        self.num_steps = len(self.timesteps)
        self.chunk = max(1, -(-self.num_steps // chunks))
        options = {"steps": steps, "clip_x0": clip_x0, "variance": variance}
        if name == "ddim":
            options["eta"] = eta

        def denoise(x, t):
            return net([x, t], training=False)

        def run(x, seeds, start, stop):
            return fn(denoise, schedule, x, seeds, start, stop, **options)

        self._run = tf.function(run, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, seeds, image_shape, progress=None) -> np.ndarray:
        """Generate one image per seed; returns float32 (B, H, W, C) in about [-1, 1]."""
        seeds = tf.constant(np.asarray(seeds, dtype=np.int32))
        x = initial_noise(seeds, tf.constant(image_shape, dtype=tf.int32))
        for start in range(0, self.num_steps, self.chunk):
            stop = min(start + self.chunk, self.num_steps)
            x = self._run(x, seeds, tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
            if progress is not None:
                progress(stop - start)
        return x.numpy()


def sampler_from_config(net, cfg, name: str = "ddpm", steps: int | None = None, eta: float = 0.0) -> Sampler:
    """The sampler the run's `sample` section describes."""
    return Sampler(net, Schedule.from_config(cfg.diffusion), name, steps, variance=cfg.sample.variance,
                   clip_x0=cfg.sample.clip_x0, eta=eta, jit_compile=use_xla(cfg.train.jit_compile))


def load_run(run_dir: Path | None, runs_root: Path, checkpoint: int | None = None):
    """(RunDir, config, EMA network, step) of a run; the newest run under `runs_root` by default."""
    run = RunDir(run_dir if run_dir is not None else find_latest_run(runs_root))
    cfg = run.load_config()
    step, export = run.latest_export(checkpoint)
    apply_policy(cfg.train.precision)  # the sampler runs in the precision the run trained in
    net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels, name="ema_unet")
    load_weights(net, export)
    return run, cfg, net, step


def sample(run_dir: Path | None = None, *, runs_root: Path = Path("runs"), n: int | None = None,
           seed: int | None = None, batch_size: int | None = None, out: Path | None = None,
           checkpoint: int | None = None, echo=print, progress_factory=None) -> Path:
    """Generate `n` images from a run's EMA weights; write a grid PNG and one PNG per image. Returns the grid path."""
    run, cfg, net, step = load_run(run_dir, runs_root, checkpoint)
    n = n or cfg.sample.n
    seed = cfg.sample.seed if seed is None else seed
    batch_size = batch_size or cfg.sample.batch_size
    size, channels = cfg.data.image_size, cfg.data.channels
    sampler = sampler_from_config(net, cfg)
    out = Path(out) if out else run.samples / f"grid-step{step}-seed{seed}-n{n}.png"
    singles_dir = out.with_suffix("")
    echo(f"sampling {n} images from {run.path} (step {step}, ddpm, {sampler.num_steps} steps, seed {seed})")

    seeds = seed + np.arange(n)
    bar = progress_factory(total=sampler.num_steps * -(-n // batch_size)) if progress_factory else None
    images = []
    for lo in range(0, n, batch_size):
        batch_seeds = seeds[lo:lo + batch_size]
        x = sampler(batch_seeds, (size, size, channels), progress=bar.update if bar else None)
        images.append(to_uint8(x))
    if bar:
        bar.close()
    images = np.concatenate(images)
    meta_common = {"ddpm_tf:run": str(run.path), "ddpm_tf:step": step, "ddpm_tf:sampler": "ddpm",
                   "ddpm_tf:steps": sampler.num_steps}
    for i, (img, s) in enumerate(zip(images, seeds)):
        save_png(singles_dir / f"{i:04d}-seed{int(s)}.png", img, {**meta_common, "ddpm_tf:seed": int(s)})
    save_png(out, make_grid(images), {**meta_common, "ddpm_tf:seeds": f"{seed}..{seed + n - 1}"})
    echo(f"wrote {out} and {n} images in {singles_dir}")
    return out
