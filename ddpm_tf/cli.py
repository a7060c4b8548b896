"""The `ddpm` command line. Thin: parse, call one function, turn user errors into clean messages.

TensorFlow is imported only inside commands that need it, after the config has been checked, so
`ddpm --help` is instant and a bad config fails in a fraction of a second.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from . import __version__
from .data.decode import CHANNELS, CROPS
from .precision import JIT_MODES, PRECISIONS
from .samplers import GUIDANCE_MAX, SAMPLER_NAMES, SPACINGS, describe_default_steps, describe_samplers
from .seeds import SEED_MAX, check_seed_range

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class FiniteFloat(click.FloatRange):
    """A FloatRange that refuses nan and inf, which FloatRange lets through (every comparison with NaN is
    false). The type of every float option."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class SamplerList(click.ParamType):
    """`ddpm,ddim:50`: sampler names, each with optional steps, as [(name, steps or None)]."""

    name = "samplers"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        out = []
        for item in (v.strip() for v in str(value).split(",")):
            name, _, steps = item.partition(":")
            if name not in SAMPLER_NAMES:
                self.fail(f"{item!r}: expected a sampler from {', '.join(SAMPLER_NAMES)}, optionally :STEPS",
                          param, ctx)
            if steps and not (steps.isdigit() and int(steps) >= 1):
                self.fail(f"{item!r}: the steps after ':' must be a whole number >= 1", param, ctx)
            out.append((name, int(steps) if steps else None))
        return out


class GuidanceList(click.ParamType):
    """`1,2,4`: guidance scales, each finite and in [0, 100]."""

    name = "scales"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        scale = FiniteFloat(0.0, GUIDANCE_MAX)
        return [scale.convert(v.strip(), param, ctx) for v in str(value).split(",")]


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _progress(total, desc=None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, smoothing=0.1)


def _user_errors(fn, *args, **kwargs):
    """Run fn, turning the package's user-facing errors, and any failure of the file system, into one line."""
    from .errors import Interrupted, UserError

    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = exc.exit_code
        raise error from None
    except Interrupted as exc:
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:  # a read-only folder, a full disk, a file where a folder should be, ...
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        raise click.ClickException(f"{where + ': ' if where else ''}{exc.strerror or exc}") from None


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ddpm_tf")
def main():
    """Train denoising diffusion models (DDPM) on your own images, then sample new ones.

    \b
    Typical use:
      ddpm train --config configs/portrait64.yaml
      ddpm sample --n 64
    """


@main.command(epilog="""\b
Examples:
  ddpm train --config configs/demo.yaml
  ddpm train --config configs/portrait64.yaml --set train.batch_size=32 --set run.dir=runs/faces-b32
  ddpm train --config configs/demo.yaml --restart     # start the run over, deleting its checkpoints
  ddpm train --config configs/mine.yaml --init-from runs/demo@3750   # start from another run's weights""")
@click.option("--config", "-c", "config_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable), typed like in the file, e.g. train.epochs=10.")
@click.option("--restart", is_flag=True, help="Start over even if the run directory holds checkpoints.")
@click.option("--init-from", "init_from", default=None, metavar="RUN[@STEP]",
              help="Start a new run from another run's EMA weights (its newest export, or the one at STEP), with a "
                   "fresh optimizer and step counter; the same network is required. Sets train.init_from.")
def train(config_path: Path, overrides: tuple[str, ...], restart: bool, init_from: str | None):
    """Train (or resume) the run described by a config file.

    A run directory (run.dir) with checkpoints is resumed from the newest one; the resolved config,
    checkpoints, EMA weight exports, preview grids and metrics.csv are written there.
    """
    from .config import load_config

    if init_from is not None:
        overrides = (*overrides, f"train.init_from={init_from}")
    cfg = _user_errors(load_config, config_path, list(overrides))
    _quiet_tensorflow()
    from .train import train as run_train

    _user_errors(run_train, cfg, restart=restart, echo=click.echo, progress_factory=_progress,
                 log=lambda msg: click.echo(f"warning: {msg}", err=True))


@main.command(epilog="""\b
Examples:
  ddpm prepare ~/Pictures/faces --size 64 --crop face
  ddpm prepare photos --channels 1 --crop none --out data/cache/photos-gray
  ddpm prepare --config configs/demo.yaml        # exactly what `ddpm train` would prepare""")
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("--size", type=click.IntRange(8, 1024), default=None, help="Square side in pixels. [default: data.image_size]")
@click.option("--channels", type=click.Choice([str(c) for c in CHANNELS]), default=None, help="1 grayscale, 3 RGB. [default: data.channels]")
@click.option("--crop", type=click.Choice(CROPS), default=None,
              help="center square, face (centre on the largest face), none (pad to square). [default: data.crop]")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Cache folder. [default: data.cache; auto is data/cache/NAME-KEY]")
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take the data section from this config (the options above override it).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, e.g. data.near_duplicate_threshold=6.")
def prepare(src, size, channels, crop, out, config_path, overrides):
    """Check, decode and cache every image under SRC, and report what happened to each file.

    Every file ends as used or skipped with a reason (not an image, truncated or corrupt, too small,
    duplicate, near duplicate, decompression bomb, unreadable, symlink loop, ...), listed in the
    cache's manifest.json. SRC is only read. A re-run decodes only new or changed files; `ddpm train`
    runs this step itself.
    """
    from .config import load_config

    if src is None and config_path is None:
        raise click.UsageError("give SRC (a folder of images) or --config (whose data.dir is used)")
    flags = {"dir": src, "image_size": size, "channels": channels, "crop": crop, "cache": out}
    sets = [f"data.{k}={v}" for k, v in flags.items() if v is not None] + list(overrides)
    cfg = _user_errors(load_config, config_path, sets)
    from .data.prepare import prepare as run_prepare

    _user_errors(run_prepare, cfg.data, echo=click.echo, progress_factory=_progress)


def _sample_options(fn):
    """Options shared by the commands that read a run."""
    fn = click.option("--checkpoint", type=click.IntRange(0), default=None,
                      help="Use the weights exported at this training step. [default: the newest]")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace existing files at --out (never the input image).")(fn)
    fn = click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
                      help="Output PNG path; an existing file is refused without --overwrite. "
                           "[default: RUN/samples/NNNNN-..., numbered so that nothing is replaced]")(fn)
    fn = click.option("--runs-root", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
                      help="Where to look for the newest run when --run is not given.")(fn)
    fn = click.option("--run", "run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
                      default=None, help="Run directory. [default: the newest run under --runs-root]")(fn)
    return fn


def _label_options(fn):
    """--class, --tags and --guidance: what to draw from a run trained with labels (data.labels)."""
    fn = click.option("--guidance", type=FiniteFloat(0.0, GUIDANCE_MAX), default=None, metavar="W",
                      help="Classifier-free guidance: uncond + W (cond - uncond); 1 plain conditional, 0 "
                           "unconditional, higher more typical of the class. [default: sample.guidance]")(fn)
    fn = click.option("--tags", "tags", multiple=True, metavar='"TAG, TAG"',
                      help="Draw images with these caption tags (a run with data.labels: tags); repeatable, "
                           "one grid row each.")(fn)
    fn = click.option("--class", "classes", multiple=True, metavar="NAME|all",
                      help="Draw this class (a run with data.labels: folders); repeatable, one grid row each; "
                           "`all`: one row per class.")(fn)
    return fn


def _parse_seeds(text: str | None):
    from .errors import ConfigError
    from .seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command(epilog="""\b
Examples:
  ddpm sample --n 64                              # newest run under runs/, 8x8 grid + 64 PNGs
  ddpm sample --sampler dpmpp_2m --steps 20 --n 64  # the same kind of faces in 50x fewer steps
  ddpm sample --run runs/demo --n 16 --seed 7 --out faces.png
  ddpm sample --seeds 17,42 --sampler ddpm        # regenerate two images (seeds from their PNG metadata)
  ddpm sample --run runs/demo --checkpoint 3125   # the weights exported at step 3125
  ddpm sample --run runs/demo-people --class s7 --guidance 3   # person 7 (a run trained with labels)
  ddpm sample --run runs/demo-people --class all --n 4         # one row of 4 per class""")
@_sample_options
@_label_options
@click.option("--n", type=click.IntRange(1, 100000), default=None, help="Images to generate. [default: sample.n]")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
              help="Image i uses seed + i, whatever the batch size. [default: sample.seed]")
@click.option("--seeds", "seeds_text", default=None, metavar="S1,S2,...",
              help="Generate exactly these seeds (overrides --n and --seed).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None,
              help="Images per sampler batch; halved automatically when memory runs out. [default: sample.batch_size]")
@click.option("--sampler", type=click.Choice(SAMPLER_NAMES), default=None,
              help=f"{describe_samplers()}. [default: sample.sampler]")
@click.option("--steps", type=click.IntRange(1), default=None,
              help=f"Sampler steps, 1..T. [default: sample.steps, else {describe_default_steps()}]")
@click.option("--eta", type=FiniteFloat(0.0, 1.0), default=None,
              help="DDIM noise: 0 deterministic, 1 DDPM-like (a sampler without eta refuses it). "
                   "[default: sample.eta]")
@click.option("--spacing", type=click.Choice(SPACINGS), default=None,
              help="Which timesteps a short sampler visits. [default: sample.spacing]")
@click.option("--stall-timeout", type=FiniteFloat(0.0, 604800.0), default=None, metavar="SECONDS",
              help="Warn with every thread's stack when no sampler step finishes for this long (0: off). "
                   "[default: the run's run.stall_timeout]")
def sample(run_dir, runs_root, out, overwrite, checkpoint, classes, tags, guidance, n, seed, seeds_text,
           batch_size, sampler, steps, eta, spacing, stall_timeout):
    """Generate images with a trained run's EMA weights: a near-square grid and one PNG per image.

    Each PNG records its run, step, sampler, steps and seed (and class or tags, and guidance) in PNG text
    metadata: the same options with --seeds regenerate it exactly. With --class or --tags, --n is the images
    per grid row.
    """
    seeds = _parse_seeds(seeds_text)
    if seeds is None and seed is not None and n is not None:
        _user_errors(check_seed_range, seed, n, "--seed", "--n")
    _quiet_tensorflow()
    from .sample import sample as run_sample

    grid = _user_errors(run_sample, run_dir, runs_root=runs_root, n=n, seed=seed, seeds=seeds,
                        batch_size=batch_size, out=out, overwrite=overwrite, checkpoint=checkpoint, sampler=sampler,
                        steps=steps, eta=eta, spacing=spacing, classes=classes, tags=tags, guidance=guidance,
                        stall_timeout=stall_timeout, echo=click.echo,
                        progress_factory=_progress)
    click.echo(str(grid))


@main.command(name="eval", epilog="""\b
Examples:
  ddpm eval --run runs/demo --features runs/orl-features.h5 --memorization
  ddpm eval --n 1000 --sampler dpmpp_2m --steps 20       # newest run, Inception-V3 features
  ddpm eval --run runs/demo --images my_samples/         # score a folder instead of generating
  ddpm eval --run runs/demo-people --features runs/orl-features.h5 --per-class --guidance 1,2,4
  ddpm eval --run runs/demo --sampler ddpm,ddim:50,dpmpp_2m:20 --n 200   # which sampler, on your data""")
@click.option("--run", "run_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Run directory. [default: the newest run under --runs-root]")
@click.option("--runs-root", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              help="Where to look for the newest run when --run is not given.")
@click.option("--checkpoint", type=click.IntRange(0), default=None,
              help="Use the weights exported at this training step. [default: the newest]")
@click.option("--n", type=click.IntRange(2, 100000), default=None, help="Samples to generate. [default: eval.n]")
@click.option("--images", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              help="Score the images in this folder instead of generating samples.")
@click.option("--features", default=None, metavar="imagenet|FILE",
              help="Feature network: Keras' ImageNet Inception-V3, Inception weights (.h5), or a whole Keras "
                   "model file mapping images in [-1, 1] to features. [default: eval.features]")
@click.option("--sampler", "samplers", type=SamplerList(), default=None, metavar="NAME[:STEPS],...",
              help=f"Sampler(s) of the evaluated images, from {', '.join(SAMPLER_NAMES)}; a comma list sweeps them "
                   "(e.g. ddpm,ddim:50,dpmpp_2m:20), each scored apart. [default: eval.sampler]")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Steps of a sampler given without :STEPS. [default: eval.steps]")
@click.option("--eta", type=FiniteFloat(0.0, 1.0), default=None, help="Its DDIM eta. [default: eval.eta]")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
              help="Sample i uses seed + i. [default: eval.seed]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None,
              help="Images per sampler batch. [default: sample.batch_size]")
@click.option("--set", "overrides", multiple=True, metavar="eval.KEY=VALUE",
              help="Override a key of the run's eval section, e.g. --set eval.kid_subset_size=50 (repeatable).")
@click.option("--memorization", is_flag=True,
              help="Also match every sample to its nearest training image (pixels and features, mirrors "
                   "included), report the share of near-copies and write the closest pairs as a PNG.")
@click.option("--per-class", is_flag=True,
              help="A run with labels: score each class (or tag) apart against its own training images, with the "
                   "class accuracy of a linear probe on the features. Implied by --class, --tags and --guidance.")
@click.option("--class", "classes", multiple=True, metavar="NAME|all",
              help="Per-class eval of this class only (repeatable). [default: every class]")
@click.option("--tags", "tags", multiple=True, metavar='"TAG, TAG"', help="Per-tag eval of these tags (repeatable).")
@click.option("--guidance", "guidances", type=GuidanceList(), default=None, metavar="W,W,...",
              help="Guidance scale(s) of a per-class eval; a comma list sweeps them, e.g. 1,2,4. "
                   "[default: sample.guidance]")
def eval_command(run_dir, runs_root, checkpoint, n, images, features, samplers, steps, eta, seed, batch_size,
                 overrides, memorization, per_class, classes, tags, guidances):
    """Score a run: KID and FID of its samples against its training images, and optionally a memorisation
    report. Results are appended to RUN/eval.csv and TensorBoard; grids and pairs go to RUN/eval/.

    With --per-class, --n is the samples per class [default: eval.n spread over the classes, at least 8].
    """
    if images is None and seed is not None and n is not None:
        _user_errors(check_seed_range, seed, n, "--seed", "--n")
    _quiet_tensorflow()
    from .evaluation.command import run_eval

    samplers = [(name, s or steps) for name, s in samplers or [(None, None)]]
    _user_errors(run_eval, run_dir, runs_root=runs_root, checkpoint=checkpoint, n=n, images=images,
                 features=features, samplers=samplers, eta=eta, seed=seed, batch_size=batch_size,
                 overrides=list(overrides), memorization=memorization, per_class=per_class, classes=classes,
                 tags=tags, guidances=guidances, echo=click.echo, progress_factory=_progress)


@main.command(epilog="""\b
Examples:
  ddpm interpolate --seeds 3 17 --frames 16
  ddpm interpolate --run runs/demo --seeds 0 1 --frames 8 --steps 100 --out morph.png""")
@_sample_options
@_label_options
@click.option("--seeds", type=click.IntRange(0, SEED_MAX), nargs=2, required=True, metavar="A B",
              help="The two seeds to morph between.")
@click.option("--frames", type=click.IntRange(2, 256), default=16, help="Frames, both ends included.")
@click.option("--steps", type=click.IntRange(1), default=None, help="DDIM steps. [default: sample.steps or 50]")
def interpolate(run_dir, runs_root, out, overwrite, checkpoint, classes, tags, guidance, seeds, frames, steps):
    """Morph between two seeds: spherical interpolation of their initial noise, DDIM with eta 0.

    Writes a strip PNG and an animated GIF beside it.
    """
    _quiet_tensorflow()
    from .sample import interpolate as run_interpolate

    path = _user_errors(run_interpolate, run_dir, seeds[0], seeds[1], frames=frames, steps=steps,
                        runs_root=runs_root, out=out, overwrite=overwrite, checkpoint=checkpoint, classes=classes,
                        tags=tags, guidance=guidance, echo=click.echo)
    click.echo(str(path))


@main.command(epilog="""\b
Examples:
  ddpm img2img photo.jpg --strength 0.5
  ddpm img2img sketch.png --strength 0.8 --seed 3 --run runs/demo --out dreamed.png""")
@click.argument("image", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_sample_options
@_label_options
@click.option("--strength", type=FiniteFloat(0.0, 1.0), default=0.5,
              help="How far to noise the image: 0 keeps it, 1 starts from (almost) pure noise.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, help="Seed of the added noise.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="DDIM steps for the whole range (strength 0.5 runs about half). [default: sample.steps or 50]")
def img2img(image, run_dir, runs_root, out, overwrite, checkpoint, classes, tags, guidance, strength, seed, steps):
    """SDEdit: noise IMAGE to the level matching --strength and denoise it with the run's model.

    The image is prepared like training data (orientation, colour mode, data.crop, resize). Writes the
    result and a before/after pair.
    """
    _quiet_tensorflow()
    from .sample import img2img as run_img2img

    path = _user_errors(run_img2img, run_dir, image, strength=strength, seed=seed, steps=steps,
                        runs_root=runs_root, out=out, overwrite=overwrite, checkpoint=checkpoint, classes=classes,
                        tags=tags, guidance=guidance, echo=click.echo)
    click.echo(str(path))


@main.command(name="runs", epilog="""\b
Examples:
  ddpm runs
  ddpm runs --runs-root /data/experiments""")
@click.option("--runs-root", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              help="Folder whose sub-folders are runs.")
def list_runs(runs_root: Path):
    """List the runs under a folder: step, epoch, last loss, newest checkpoint's time and size."""
    from .runs import describe_runs

    rows = describe_runs(runs_root)
    if not rows:
        raise click.ClickException(f"no run under {runs_root}/ (a run is a folder with config.yaml)")
    header = ("run", "step", "epoch", "loss", "checkpoint", "MB", "")
    table = [header] + [(r["run"], str(r["step"] or "-"), str(r["epoch"] or "-"), str(r["loss"] or "-"),
                         r["checkpoint_time"] or "-", str(r["checkpoint_mb"]), f"training ({r['trainer']})" if r["training"] else "")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@main.command(epilog="""\b
Examples:
  ddpm ui                                        # http://127.0.0.1:7860/ over runs/ and configs/
  ddpm ui --runs /data/experiments --port 8080
  ddpm ui --listen 0.0.0.0 --auth-file ~/.ddpm-ui-password   # reachable from the network, with a password""")
@click.option("--runs", "runs_root", type=click.Path(path_type=Path, file_okay=False), default=Path("runs"),
              help="The runs folder the page lists, reads and writes samples in.")
@click.option("--configs", "configs_root", type=click.Path(path_type=Path, file_okay=False), default=Path("configs"),
              help="The configs the Train and Data tabs offer.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, help="TCP port.")
@click.option("--listen", metavar="HOST", default=None,
              help="Listen on this address instead of 127.0.0.1 (needs --auth or --auth-file).")
@click.option("--auth", metavar="USER:PASSWORD", default=None, help="Ask for this user and password.")
@click.option("--auth-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file whose first line is USER:PASSWORD.")
def ui(runs_root, configs_root, port, listen, auth, auth_file):
    """A local web page: generate, img2img and interpolate, browse runs, train, prepare data.

    Needs the ui extra (pip install -e ".[ui]"). Works offline. The page reads and serves only files under
    the runs folder, the configs folder and the data folders of those runs and configs.
    """
    from .ui.access import access

    host, credentials = _user_errors(access, listen, auth, auth_file)
    _quiet_tensorflow()
    try:
        from .ui.app import serve
    except ImportError as exc:
        raise click.ClickException(f"ddpm ui needs Gradio ({exc.name or exc}): pip install -e \".[ui]\"") from None
    _user_errors(serve, runs_root, configs_root, host=host, port=port, auth=credentials, echo=click.echo)


@main.command(epilog="""\b
Examples:
  ddpm bench                                     # configs/bench32.yaml, float32
  ddpm bench --precision mixed_bfloat16 --jit-compile false
  ddpm bench --config configs/portrait64.yaml --batch-size 64
  ddpm bench --set train.augment_p=0.15             # with non-leaky augmentation
  ddpm bench --replicas 2                        # 2 mirrored devices (GPUs, or the CPU split in 2) against 1""")
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("configs/bench32.yaml"), help="Config whose network is measured.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Override train.precision. [default: the config's]")
@click.option("--jit-compile", type=click.Choice(JIT_MODES), default=None,
              help="Override train.jit_compile (XLA). [default: the config's]")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: train.batch_size]")
@click.option("--steps", type=click.IntRange(1), default=4, help="Timed train steps (after 2 warm-up steps).")
@click.option("--sample-n", type=click.IntRange(1), default=16, help="Images per sampler batch.")
@click.option("--sample-steps", type=click.IntRange(1), default=10, help="Timed sampler steps.")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Also train on this many devices under MirroredStrategy (the first K GPUs; without GPUs, the CPU "
                   "split into K logical devices), --batch-size images each; prints the scaling efficiency.")
@click.option("--json-only", is_flag=True, help="Print only the JSON line.")
@click.option("--set", "extra", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value (repeatable), e.g. train.augment_p=0.15.")
def bench(config_path, precision, jit_compile, batch_size, steps, sample_n, sample_steps, replicas, json_only,
          extra):
    """Measure train images/s and sampler network evaluations/s of a configured network.

    Prints one JSON line and a readable table. Compare ratios within one session only: absolute
    times drift on shared machines (scripts/bench_compare.py alternates the competitors).
    """
    from .config import load_config

    overrides = list(extra)
    if precision:
        overrides.append(f"train.precision={precision}")
    if jit_compile:
        overrides.append(f"train.jit_compile={jit_compile}")
    cfg = _user_errors(load_config, config_path, overrides)
    _quiet_tensorflow()
    from .bench import format_table, run_bench, to_json
    from .distribute import split_cpu

    if replicas > 1:
        split_cpu(replicas)  # before TensorFlow starts; a no-op where there are GPUs
    result = _user_errors(run_bench, cfg, batch_size=batch_size or cfg.train.batch_size, steps=steps,
                          sample_n=sample_n, sample_steps=sample_steps, replicas=replicas)
    click.echo(to_json(result))
    if not json_only:
        click.echo(format_table(result))


if __name__ == "__main__":
    main()
