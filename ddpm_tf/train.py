"""Training orchestration: config -> run dir -> data -> networks -> fit with callbacks. Reads top to bottom."""

from __future__ import annotations

import math
import shutil

import numpy as np
import yaml

from . import compat
from .callbacks import Checkpointer, EpochCounter, MetricsCSV, Preview, Progress
from .compat import keras, tf
from .config import ConfigError, to_dict
from .data import load_folder, make_dataset
from .diffusion import DiffusionModel
from .images import atomic_write_bytes
from .precision import apply_policy, make_optimizer
from .runs import RunDir, RunError
from .sample import sampler_from_config
from .schedule import Schedule
from .unet import build_unet

# Sections whose change makes an old checkpoint meaningless for a new config.
_FROZEN_KEYS = ("model", "diffusion", "data.image_size", "data.channels")


def _check_resume_compatible(saved, cfg, run: RunDir) -> None:
    """Refuse to resume a run whose network or process differs from the new config."""
    old, new = to_dict(saved), to_dict(cfg)
    for key in _FROZEN_KEYS:
        section, _, name = key.partition(".")
        keys = [name] if name else list(new[section])
        for k in keys:
            if old[section].get(k) != new[section][k]:
                raise ConfigError(
                    f"{run.config_path}: {section}.{k} was {old[section].get(k)!r} in this run, the new config "
                    f"says {new[section][k]!r}; pass --restart to start the run over, or set run.dir to a new folder")


def _written_by_path(run: RunDir):
    return run.checkpoints / "written_by.yaml"


def _check_written_by(run: RunDir) -> None:
    """Training checkpoints hold Keras-version-specific optimizer state: refuse a cross-version resume."""
    path = _written_by_path(run)
    if not path.is_file():
        return
    info = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    keras_version = str(info.get("keras", ""))
    if keras_version.split(".")[0] != compat.KERAS_VERSION.split(".")[0]:
        raise RunError(
            f"{run.checkpoints}: these checkpoints were written by Keras {keras_version} (TensorFlow "
            f"{info.get('tf')}); this is Keras {compat.KERAS_VERSION}, whose optimizer state differs. Resume with "
            f"that TensorFlow line, or pass --restart. Sampling works on either line (exports/ are portable).")


def write_written_by(run: RunDir) -> None:
    """Record which TensorFlow/Keras wrote the run's checkpoints."""
    text = yaml.safe_dump({"tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION})
    atomic_write_bytes(_written_by_path(run), text.encode("utf-8"))


def use_xla(jit_compile: str) -> bool:
    """`auto`: XLA on GPUs (usually faster there), off on CPUs (measured slower on CPUs here)."""
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return jit_compile == "true"


def train(cfg, *, restart: bool = False, echo=print, progress_factory=None, log=print) -> RunDir:
    """Train (or resume) the run `cfg.run.dir`; returns its RunDir."""
    run = RunDir(cfg.run.dir)

    # --- run directory: resume by default, start over only when asked ----------------------------
    has_checkpoint = tf.train.latest_checkpoint(str(run.checkpoints)) is not None
    if has_checkpoint and not restart:
        _check_resume_compatible(run.load_config(), cfg, run)
    if restart:
        for sub in (run.checkpoints, run.exports, run.previews):
            shutil.rmtree(sub, ignore_errors=True)
        run.metrics_csv.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)

    # --- data --------------------------------------------------------------------------------------
    images, skipped = load_folder(cfg.data, warn=log)
    num_images = len(images)
    steps_per_epoch = math.ceil(num_images / cfg.train.batch_size)
    echo(f"data: {num_images} images from {cfg.data.dir} ({len(skipped)} skipped), "
         f"{steps_per_epoch} steps per epoch at batch {cfg.train.batch_size}")

    # --- networks, optimizer, checkpoint ----------------------------------------------------------
    keras.utils.set_random_seed(cfg.train.seed)
    apply_policy(cfg.train.precision)
    size, channels = cfg.data.image_size, cfg.data.channels
    net = build_unet(cfg.model, size, channels, name="unet")
    ema_net = build_unet(cfg.model, size, channels, name="ema_unet")
    schedule = Schedule.from_config(cfg.diffusion)
    model = DiffusionModel(net, ema_net, schedule, cfg.train)
    optimizer = make_optimizer(cfg.train)
    xla = use_xla(cfg.train.jit_compile)
    model.compile(optimizer=optimizer, **compat.compile_kwargs(xla))
    compat.build_optimizer(optimizer, net.trainable_variables)
    echo(f"model: {net.count_params():,} parameters, TensorFlow {compat.TF_VERSION} "
         f"(Keras {compat.KERAS_VERSION}), XLA {'on' if xla else 'off'}")

    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    ckpt = tf.train.Checkpoint(net=net, ema=ema_net, optimizer=optimizer, rng=model.rng,
                               ema_updates=model.ema_updates, epoch=epoch_var)
    manager = tf.train.CheckpointManager(ckpt, str(run.checkpoints), max_to_keep=cfg.run.keep_last)
    if manager.latest_checkpoint:
        _check_written_by(run)
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        echo(f"resuming {run.path} from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy())}, "
             f"step {int(optimizer.iterations.numpy())})")
    initial_epoch = int(epoch_var.numpy())
    run.save_config(cfg)
    write_written_by(run)
    if initial_epoch >= cfg.train.epochs:
        echo(f"{run.path} already has {initial_epoch} of {cfg.train.epochs} epochs; raise train.epochs to go on")
        return run

    # --- fit -------------------------------------------------------------------------------------
    dataset = make_dataset(images, cfg.train.batch_size, cfg.train.seed, initial_epoch, cfg.data.flip)
    total_steps = steps_per_epoch * (cfg.train.epochs - initial_epoch)
    bar = progress_factory(total=total_steps, desc="train") if progress_factory else _NullBar()
    progress = Progress(total_steps, cfg.train.batch_size, num_images, steps_per_epoch, bar)
    preview_seeds = cfg.run.preview_seed + np.arange(cfg.run.preview_n)
    preview_sampler = sampler_from_config(ema_net, cfg, "ddim", 50)
    meta = {"config": to_dict(cfg), "tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION}
    callbacks = [
        progress,
        EpochCounter(),
        MetricsCSV(run, progress),
        Checkpointer(run, manager, epoch_var, cfg.run.checkpoint_every, cfg.run.keep_last, ema_net, meta, echo),
        Preview(run, preview_sampler, preview_seeds, (size, size, channels), cfg.run.preview_every, echo),
    ]
    try:
        model.fit(dataset, epochs=cfg.train.epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=0, shuffle=False)
    finally:
        bar.close()
    step = int(optimizer.iterations.numpy())
    echo(f"done: {run.path} at epoch {int(epoch_var.numpy())}, step {step}; "
         f"sample with `ddpm sample --run {run.path} --n 64`")
    return run


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass
