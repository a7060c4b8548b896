"""Sampling orchestration: run dir -> saved config -> network with EMA weights -> compiled sampler -> PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .compat import tf
from .errors import RunError
from .images import atomic_write_bytes, make_grid, save_png, to_float, to_uint8
from .outputs import Outputs
from .precision import apply_policy, use_xla
from .runs import RunDir, find_latest_run, load_weights
from .samplers import DEFAULT_STEPS, SAMPLERS, initial_noise, reverse_steps, sampler_timesteps
from .schedule import Schedule
from .seeds import check_seed_range
from .unet import build_unet
from .watchdog import Watchdog


class Sampler:
    """A compiled reverse loop for one network, schedule, sampler and step count.

    The loop runs in chunks, each one call of a single `tf.function` (traced once per batch shape), so
    Python does about 20 calls per image batch and the progress bar still moves.
    """

    def __init__(self, net, schedule, name: str = "ddpm", steps: int | None = None, *, variance: str = "small",
                 clip_x0: bool = True, eta: float = 0.0, spacing: str = "linspace", jit_compile: bool = False,
                 chunks: int = 20, prediction: str = "eps"):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
        self.name = name
        if steps is None:  # the sampler's default, at most the run's T
            steps = min(DEFAULT_STEPS[name] or schedule.timesteps, schedule.timesteps)
        self.timesteps = sampler_timesteps(name, schedule.timesteps, steps, spacing)
        self.num_steps = len(self.timesteps)
        self.chunk = max(1, -(-self.num_steps // chunks))
        coefficients = SAMPLERS[name](schedule, self.timesteps, variance=variance, eta=eta)
        self.schedule = schedule

        def denoise(x, t):
            return net([x, t], training=False)

        def run(x, x0_prev, seeds, start, stop):
            return reverse_steps(denoise, schedule, (x, x0_prev), seeds, start, stop, timesteps=self.timesteps,
                                 coefficients=coefficients, clip_x0=clip_x0, prediction=prediction)

        self._run = tf.function(run, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, seeds, image_shape, progress=None, x_start=None, start_index: int = 0) -> np.ndarray:
        """One image per seed, float32 (B, H, W, C) in about [-1, 1]. `x_start` replaces the seeds' x_T
        and `start_index` skips the first steps (x_start must then be noised to that step's level)."""
        seeds = tf.constant(np.asarray(seeds, dtype=np.int32))
        x = initial_noise(seeds, tf.constant(image_shape, dtype=tf.int32)) if x_start is None else \
            tf.constant(x_start, tf.float32)
        x0_prev = tf.zeros_like(x)
        for start in range(start_index, self.num_steps, self.chunk):
            stop = min(start + self.chunk, self.num_steps)
            x, x0_prev = self._run(x, x0_prev, seeds, tf.constant(start, tf.int32), tf.constant(stop, tf.int32))
            if progress is not None:
                progress(stop - start)
        return x.numpy()


def sampler_from_config(net, cfg, name: str | None = None, steps: int | None = None, eta: float | None = None,
                        spacing: str | None = None) -> Sampler:
    """The sampler the run's `sample` section describes, with any of its settings overridden."""
    s = cfg.sample
    return Sampler(net, Schedule.from_config(cfg.diffusion), name or s.sampler, steps or s.steps or None,
                   variance=s.variance, clip_x0=s.clip_x0, eta=s.eta if eta is None else eta,
                   spacing=spacing or s.spacing, jit_compile=use_xla(cfg.train.jit_compile),
                   prediction=cfg.diffusion.prediction)


def load_run(run_dir: Path | None, runs_root: Path, checkpoint: int | None = None):
    """(RunDir, config, EMA network, step) of a run; the newest run under `runs_root` by default."""
    run = RunDir(run_dir if run_dir is not None else find_latest_run(runs_root))
    cfg = run.load_config()
    step, export = run.latest_export(checkpoint)
    apply_policy(cfg.train.precision)  # the sampler runs in the precision the run trained in
    net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels, name="ema_unet")
    try:
        load_weights(net, export)
    except RunError as exc:
        others = sorted(s for s in run.export_paths() if s != step)
        hint = f"; this run's other exports: --checkpoint {', '.join(map(str, others))}" if others else ""
        raise RunError(f"{exc}{hint}") from None
    return run, cfg, net, step


def build_sampler(net, cfg, **overrides) -> Sampler:
    try:
        return sampler_from_config(net, cfg, **overrides)
    except ValueError as exc:  # steps beyond the run's T, unknown names
        raise RunError(f"sampler: {exc}") from None


def sample_seeds(sampler, seeds, image_shape, batch_size: int, progress_factory=None, echo=print,
                 desc: str | None = None, beat=None) -> np.ndarray:
    """uint8 images, one per seed, in batches, with a progress bar over all their sampler steps; `beat(n)`
    (a stall watchdog's) is called with the steps of every finished chunk."""
    total = sampler.num_steps * -(-len(seeds) // batch_size)
    bar = progress_factory(total=total, desc=desc) if progress_factory else None
    hooks = [h for h in (bar.update if bar else None, beat) if h is not None]
    try:
        return _run_batches(sampler, seeds, image_shape, batch_size, lambda n: [h(n) for h in hooks], echo)
    finally:
        if bar is not None:
            bar.close()


def _run_batches(sampler, seeds, image_shape, batch_size: int, progress, echo) -> np.ndarray:
    """Sample all seeds in batches; a batch that does not fit in memory is split in two and retried."""
    images, lo = [], 0
    while lo < len(seeds):
        batch = seeds[lo:lo + batch_size]
        try:
            x = sampler(batch, image_shape, progress=progress)
        except tf.errors.ResourceExhaustedError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            echo(f"out of memory: retrying with batches of {batch_size}")
            continue
        images.append(to_uint8(x))
        lo += len(batch)
    return np.concatenate(images)


def sample(run_dir: Path | None = None, *, runs_root: Path = Path("runs"), n: int | None = None,
           seed: int | None = None, seeds: list[int] | None = None, batch_size: int | None = None,
           out: Path | None = None, checkpoint: int | None = None, sampler: str | None = None,
           steps: int | None = None, eta: float | None = None, spacing: str | None = None,
           overwrite: bool = False, stall_timeout: float | None = None, echo=print,
           progress_factory=None) -> Path:
    """Generate images from a run's EMA weights; write a grid PNG and one PNG per image. Returns the grid path.

    Image i gets seed `seed + i`, or the i-th of `seeds`: the same seed gives the same image whatever the
    batch size or the other seeds."""
    run, cfg, net, step = load_run(run_dir, runs_root, checkpoint)
    if seeds is None:
        first, count = cfg.sample.seed if seed is None else seed, n or cfg.sample.n
        check_seed_range(first, count, "sample.seed" if seed is None else "--seed", "sample.n" if n is None else "--n")
        seeds = list(first + np.arange(count))
    seeds = np.asarray(seeds, dtype=np.int64)
    n = len(seeds)
    batch_size = batch_size or cfg.sample.batch_size
    size, channels = cfg.data.image_size, cfg.data.channels
    smp = build_sampler(net, cfg, name=sampler, steps=steps, eta=eta, spacing=spacing)
    eta = cfg.sample.eta if eta is None else eta
    tag = f"{smp.name}{smp.num_steps}"
    single_names = [f"{i:04d}-seed{int(s)}.png" for i, s in enumerate(seeds)]
    outputs = Outputs(out, run.samples, f"grid-step{step}-{tag}-seed{int(seeds[0])}-n{n}.png",
                      companions=lambda grid: [grid.with_suffix("") / name for name in single_names],
                      overwrite=overwrite)
    outputs.check()  # before the sampling, not after it
    echo(f"sampling {n} images from {run.path} (step {step}, {smp.name}, {smp.num_steps} steps)")

    stall_timeout = cfg.run.stall_timeout if stall_timeout is None else stall_timeout
    with Watchdog(stall_timeout, "sample", "sampler step") as watchdog:
        images = sample_seeds(smp, seeds, (size, size, channels), batch_size, progress_factory, echo,
                              beat=watchdog.beat)
    meta = {"ddpm_tf:run": str(run.path), "ddpm_tf:step": step, "ddpm_tf:sampler": smp.name,
            "ddpm_tf:steps": smp.num_steps, "ddpm_tf:spacing": spacing or cfg.sample.spacing}
    if smp.name == "ddim":
        meta["ddpm_tf:eta"] = eta

    def write(paths, overwrite):
        grid, singles = paths[0], paths[1:]
        save_png(grid, make_grid(images), {**meta, "ddpm_tf:seeds": ",".join(str(int(s)) for s in seeds)}, overwrite)
        for path, img, s in zip(singles, images, seeds):
            save_png(path, img, {**meta, "ddpm_tf:seed": int(s)}, overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} and {n} images in {out.with_suffix('')}")
    return out


def slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """Spherical interpolation between two noise tensors (keeps the norm Gaussian noise has, unlike lerp)."""
    a_flat, b_flat = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    cos = np.dot(a_flat, b_flat) / (np.linalg.norm(a_flat) * np.linalg.norm(b_flat))
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    if theta < 1e-6:
        return ((1 - alpha) * a + alpha * b).astype(np.float32)
    return ((np.sin((1 - alpha) * theta) * a + np.sin(alpha * theta) * b) / np.sin(theta)).astype(np.float32)


def interpolate(run_dir: Path | None, seed_a: int, seed_b: int, *, frames: int = 16, steps: int | None = None,
                runs_root: Path = Path("runs"), out: Path | None = None, checkpoint: int | None = None,
                overwrite: bool = False, echo=print) -> Path:
    """Slerp between the initial noise of two seeds, denoise each frame with DDIM (eta 0); write a strip
    PNG and an animated GIF beside it. Returns the strip's path."""
    from PIL import Image

    run, cfg, net, step = load_run(run_dir, runs_root, checkpoint)
    shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    smp = build_sampler(net, cfg, name="ddim", steps=steps or cfg.sample.steps or None, eta=0.0)
    outputs = Outputs(out, run.samples, f"interp-step{step}-seed{seed_a}-{seed_b}.png",
                      companions=lambda strip: [strip.with_suffix(".gif")], overwrite=overwrite)
    outputs.check()
    ends = initial_noise(tf.constant([seed_a, seed_b], tf.int32), tf.constant(shape, tf.int32)).numpy()
    x_t = np.stack([slerp(ends[0], ends[1], a) for a in np.linspace(0.0, 1.0, frames)])
    echo(f"interpolating seeds {seed_a} -> {seed_b} in {frames} frames (ddim, {smp.num_steps} steps)")
    images = to_uint8(smp(np.full(frames, seed_a), shape, x_start=x_t))
    meta = {"ddpm_tf:run": str(run.path), "ddpm_tf:step": step, "ddpm_tf:sampler": "ddim",
            "ddpm_tf:steps": smp.num_steps, "ddpm_tf:seeds": f"{seed_a},{seed_b}", "ddpm_tf:frames": frames}
    pil = [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in images]
    gif = io.BytesIO()
    pil[0].save(gif, format="GIF", save_all=True, append_images=pil[1:] + pil[-2:0:-1], duration=120, loop=0)

    def write(paths, overwrite):
        save_png(paths[0], make_grid(images, cols=frames), meta, overwrite)
        atomic_write_bytes(paths[1], gif.getvalue(), overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} and {out.with_suffix('.gif')}")
    return out


def img2img(run_dir: Path | None, image: Path, *, strength: float = 0.5, seed: int = 0, steps: int | None = None,
            runs_root: Path = Path("runs"), out: Path | None = None, checkpoint: int | None = None,
            overwrite: bool = False, echo=print) -> Path:
    """SDEdit (Meng et al. 2021): noise an image to the timestep matching `strength` (0: unchanged, 1: pure
    noise) and denoise it with DDIM. Writes the input and the result side by side. Returns its path."""
    from .data.decode import decode_checked

    run, cfg, net, step = load_run(run_dir, runs_root, checkpoint)
    outputs = Outputs(out, run.samples, f"img2img-{Path(image).stem}-s{strength:g}-seed{seed}.png",
                      companions=lambda result: [result.with_name(result.stem + "-pair.png")],
                      inputs=[image], overwrite=overwrite)
    outputs.check()  # before decoding and denoising; an output never replaces the input photo
    source = decode_checked(Path(image), cfg.data)  # every guard of ddpm prepare (max_pixels, min_side): DataError
    smp = build_sampler(net, cfg, name="ddim", steps=steps or cfg.sample.steps or None)
    # Start at the first visited timestep at or below strength * (T - 1); none (strength 0): no change.
    later = np.nonzero(smp.timesteps <= strength * (smp.schedule.timesteps - 1))[0] if strength > 0 else []
    start = int(later[0]) if len(later) else smp.num_steps
    x0 = tf.constant(to_float(source)[None])
    x = x0
    if start < smp.num_steps:
        t = tf.constant([int(smp.timesteps[start])])
        x = smp.schedule.q_sample(x0, t, initial_noise(tf.constant([seed]), tf.constant(source.shape)))
    result = to_uint8(smp([seed], source.shape, x_start=x.numpy(), start_index=start))[0]
    meta = {"ddpm_tf:run": str(run.path), "ddpm_tf:step": step, "ddpm_tf:sampler": "ddim",
            "ddpm_tf:steps": smp.num_steps - start, "ddpm_tf:strength": strength, "ddpm_tf:seed": seed,
            "ddpm_tf:source": str(image)}

    def write(paths, overwrite):
        save_png(paths[0], result, meta, overwrite)
        save_png(paths[1], make_grid(np.stack([source, result]), cols=2), meta, overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} ({smp.num_steps - start} of {smp.num_steps} DDIM steps at strength {strength:g})")
    return out
