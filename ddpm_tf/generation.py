"""The generation engine shared by `ddpm sample`, `interpolate`, `img2img` and the web page: a run loaded once
(`LoadedRun`: config, EMA network, step, labels, and its compiled samplers), and the three ways of making
images from it, each writing its PNGs (names, grid, per-image seed metadata) in one place.

The CLI loads a run per command; the page keeps a `LoadedRun` per (run, checkpoint), so a second request
pays neither the network build nor the sampler's tracing again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .conditions import requested
from .errors import LabelError
from .images import atomic_write_bytes, make_grid, save_png, to_float, to_uint8
from .outputs import Outputs
from .runs import RunDir, load_run
from .samplers import initial_noise, sample_seeds, sampler_from_config, seeds_by_condition, slerp
from .seeds import check_seed_range
from .watchdog import Watchdog

ROW = 8  # images per grid row when several classes or tag sets are asked for


@dataclass
class LoadedRun:
    """One run at one checkpoint, its EMA network built and loaded once; samplers compiled once per settings."""

    run: RunDir
    cfg: object
    net: object
    step: int
    label_set: object = None
    _samplers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, run_dir: Path | None, runs_root: Path = Path("runs"), checkpoint: int | None = None) -> LoadedRun:
        """The newest run under `runs_root` by default, at its newest export unless `checkpoint` says."""
        return cls(*load_run(run_dir, runs_root, checkpoint))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.cfg.data.image_size, self.cfg.data.image_size, self.cfg.data.channels

    def sampler(self, name=None, steps=None, *, eta=None, spacing=None, guidance=None):
        """`sampler_from_config` for this run, reused for the same settings (its tf.function stays traced)."""
        key = (name, steps, eta, spacing, guidance)
        if key not in self._samplers:
            self._samplers[key] = sampler_from_config(self.net, self.cfg, name, steps, eta=eta, spacing=spacing,
                                                      guidance=guidance)
        return self._samplers[key]

    def metadata(self) -> dict:
        return {"ddpm_tf:run": str(self.run.path), "ddpm_tf:step": self.step}


def generate(loaded: LoadedRun, *, n: int | None = None, seed: int | None = None, seeds: list[int] | None = None,
             batch_size: int | None = None, out: Path | None = None, sampler: str | None = None,
             steps: int | None = None, eta: float | None = None, spacing: str | None = None,
             classes=(), tags=(), guidance: float | None = None, overwrite: bool = False,
             stall_timeout: float | None = None, echo=print, progress_factory=None) -> Path:
    """Generate images from a loaded run; write a grid PNG and one PNG per image. Returns the grid path.

    Image i gets seed `seed + i`, or the i-th of `seeds`: the same seed gives the same image whatever the
    batch size or the other seeds. On a run with labels, each of `classes` (or `all`) and `tags` is one row of
    the grid, with the same seeds in every row and `n` images per row (default: sample.n for one row, 8 for
    several); nothing asked for samples unconditionally. The images of the grid are in `images_of(grid)`."""
    run, cfg, step, label_set = loaded.run, loaded.cfg, loaded.step, loaded.label_set
    conditions = requested(label_set, classes, tags, guidance)
    if seeds is None:
        default_n = cfg.sample.n if len(conditions) <= 1 else ROW
        first, count = cfg.sample.seed if seed is None else seed, n or default_n
        check_seed_range(first, count, "sample.seed" if seed is None else "--seed", "sample.n" if n is None else "--n")
        seeds = list(first + np.arange(count))
    row_seeds = np.asarray(seeds, dtype=np.int64)
    seeds, labels = seeds_by_condition(row_seeds, [c.vector for c in conditions]) if conditions else (row_seeds, None)
    n = len(seeds)
    batch_size = batch_size or cfg.sample.batch_size
    smp = loaded.sampler(sampler, steps, eta=eta, spacing=spacing, guidance=guidance)
    per_image = [c for c in conditions for _ in row_seeds] or [None] * n
    tag = f"{smp.name}{smp.num_steps}" + (f"-{conditions[0].slug if len(conditions) == 1 else f'{len(conditions)}rows'}"
                                          f"-w{smp.guidance:g}" if conditions else "")
    single_names = [f"{i:04d}-{c.slug + '-' if c else ''}seed{int(s)}.png" for i, (s, c) in enumerate(zip(seeds, per_image))]
    outputs = Outputs(out, run.samples, f"grid-step{step}-{tag}-seed{int(seeds[0])}-n{n}.png",
                      companions=lambda grid: [images_folder(grid) / name for name in single_names],
                      overwrite=overwrite)
    outputs.check()  # before the sampling, not after it
    asked = f", {len(conditions)} rows: {', '.join(c.text for c in conditions[:4])}" + \
        (", ..." if len(conditions) > 4 else "") + f", guidance {smp.guidance:g}" if conditions else ""
    echo(f"sampling {n} images from {run.path} (step {step}, {smp.name}, {smp.num_steps} steps{asked})")
    if label_set is not None and not conditions:
        echo(f"this run has {len(label_set)} {'classes' if label_set.mode == 'folders' else 'tags'}: these samples "
             f"are unconditional; ask for one with {'--class NAME' if label_set.mode == 'folders' else '--tags'}")

    stall_timeout = cfg.run.stall_timeout if stall_timeout is None else stall_timeout
    with Watchdog(stall_timeout, "sample", "sampler step") as watchdog:
        images = sample_seeds(smp, seeds, loaded.shape, batch_size, progress_factory, echo,
                              beat=watchdog.beat, labels=labels)
    meta = {**loaded.metadata(), **smp.metadata()}
    grid_meta = {**meta, "ddpm_tf:seeds": ",".join(str(int(s)) for s in row_seeds)}
    if conditions:
        grid_meta["ddpm_tf:rows"] = " | ".join(f"{c.kind} {c.text}" for c in conditions)

    def write(paths, overwrite):
        grid, singles = paths[0], paths[1:]
        save_png(grid, make_grid(images, cols=len(row_seeds) if len(conditions) > 1 else None), grid_meta, overwrite)
        for path, img, s, c in zip(singles, images, seeds, per_image):
            save_png(path, img, {**meta, "ddpm_tf:seed": int(s), **(c.metadata() if c else {})}, overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} and {n} images in {images_folder(out)}")
    return out


def images_folder(grid: Path) -> Path:
    """The folder of the per-image PNGs beside a grid: grid.png -> grid/."""
    return Path(grid).with_suffix("")


def images_of(grid: Path) -> list[Path]:
    """The per-image PNGs of a grid that `generate` wrote, in grid order."""
    return sorted(images_folder(grid).glob("[0-9][0-9][0-9][0-9]-*.png"))


def one_condition(label_set, classes, tags, guidance, command: str):
    """The single condition of img2img or interpolate (None: unconditional), as a (1, K) label row."""
    conditions = requested(label_set, classes, tags, guidance)
    if len(conditions) > 1:
        raise LabelError(f"{command} draws one class or one set of tags at a time; got {len(conditions)}: "
                         + ", ".join(c.text for c in conditions[:4]))
    return (conditions[0], conditions[0].vector[None]) if conditions else (None, None)


def interpolate(loaded: LoadedRun, seed_a: int, seed_b: int, *, frames: int = 16, steps: int | None = None,
                out: Path | None = None, classes=(), tags=(), guidance: float | None = None,
                overwrite: bool = False, echo=print) -> Path:
    """Slerp between the initial noise of two seeds, denoise each frame with DDIM (eta 0), of one class or
    tag set on a run with labels; write a strip PNG and an animated GIF beside it. Returns the strip's path."""
    from PIL import Image

    from .compat import tf

    run, step = loaded.run, loaded.step
    condition, row = one_condition(loaded.label_set, classes, tags, guidance, "interpolate")
    shape = loaded.shape
    smp = loaded.sampler("ddim", steps, eta=0.0, guidance=guidance)
    what = f"-{condition.slug}-w{smp.guidance:g}" if condition else ""
    outputs = Outputs(out, run.samples, f"interp-step{step}{what}-seed{seed_a}-{seed_b}.png",
                      companions=lambda strip: [strip.with_suffix(".gif")], overwrite=overwrite)
    outputs.check()
    ends = initial_noise(tf.constant([seed_a, seed_b], tf.int32), tf.constant(shape, tf.int32)).numpy()
    x_t = np.stack([slerp(ends[0], ends[1], a) for a in np.linspace(0.0, 1.0, frames)])
    echo(f"interpolating seeds {seed_a} -> {seed_b} in {frames} frames (ddim, {smp.num_steps} steps)")
    labels = None if row is None else np.repeat(row, frames, axis=0)
    images = to_uint8(smp(np.full(frames, seed_a), shape, x_start=x_t, labels=labels))
    meta = {**loaded.metadata(), **smp.metadata(), "ddpm_tf:seeds": f"{seed_a},{seed_b}", "ddpm_tf:frames": frames,
            **(condition.metadata() if condition else {})}
    pil = [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in images]
    gif = io.BytesIO()
    pil[0].save(gif, format="GIF", save_all=True, append_images=pil[1:] + pil[-2:0:-1], duration=120, loop=0)

    def write(paths, overwrite):
        save_png(paths[0], make_grid(images, cols=frames), meta, overwrite)
        atomic_write_bytes(paths[1], gif.getvalue(), overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} and {out.with_suffix('.gif')}")
    return out


def img2img(loaded: LoadedRun, image: Path, *, strength: float = 0.5, seed: int = 0, steps: int | None = None,
            out: Path | None = None, classes=(), tags=(), guidance: float | None = None, overwrite: bool = False,
            source_name: str | None = None, echo=print) -> Path:
    """SDEdit (Meng et al. 2021): noise an image to the timestep matching `strength` (0: unchanged, 1: pure
    noise) and denoise it with DDIM, towards one class or tag set on a run with labels. Writes the result and
    the input and result side by side (`NAME-pair.png`). Returns the result's path. `source_name` names the
    input in file names and metadata when `image` is a temporary copy (an upload)."""
    from .compat import tf
    from .data.decode import decode_checked

    run, cfg = loaded.run, loaded.cfg
    condition, row = one_condition(loaded.label_set, classes, tags, guidance, "img2img")
    what = f"-{condition.slug}" if condition else ""
    source_name = source_name or str(image)
    outputs = Outputs(out, run.samples, f"img2img-{Path(source_name).stem}{what}-s{strength:g}-seed{seed}.png",
                      companions=lambda result: [result.with_name(result.stem + "-pair.png")],
                      inputs=[image], overwrite=overwrite)
    outputs.check()  # before decoding and denoising; an output never replaces the input photo
    source = decode_checked(Path(image), cfg.data)  # every guard of ddpm prepare (max_pixels, min_side): DataError
    smp = loaded.sampler("ddim", steps, guidance=guidance)
    # Start at the first visited timestep at or below strength * (T - 1); none (strength 0): no change.
    later = np.nonzero(smp.timesteps <= strength * (smp.schedule.timesteps - 1))[0] if strength > 0 else []
    start = int(later[0]) if len(later) else smp.num_steps
    x0 = tf.constant(to_float(source)[None])
    x = x0
    if start < smp.num_steps:
        t = tf.constant([int(smp.timesteps[start])])
        x = smp.schedule.q_sample(x0, t, initial_noise(tf.constant([seed]), tf.constant(source.shape)))
    result = to_uint8(smp([seed], source.shape, x_start=x.numpy(), start_index=start, labels=row))[0]
    meta = {**loaded.metadata(), **smp.metadata(start_index=start), "ddpm_tf:strength": strength,
            "ddpm_tf:seed": seed, "ddpm_tf:source": source_name, **(condition.metadata() if condition else {})}

    def write(paths, overwrite):
        save_png(paths[0], result, meta, overwrite)
        save_png(paths[1], make_grid(np.stack([source, result]), cols=2), meta, overwrite)

    out = outputs.write(write)
    echo(f"wrote {out} ({smp.num_steps - start} of {smp.num_steps} DDIM steps at strength {strength:g})")
    return out
