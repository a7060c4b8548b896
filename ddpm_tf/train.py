"""Training orchestration: config -> locked run dir -> data -> networks -> fit with callbacks. Reads top to bottom."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import yaml

from . import compat
from .callbacks import (
    Checkpointer,
    Evaluate,
    Heartbeat,
    Logger,
    Preview,
    Progress,
    ProgressFile,
    RunState,
    StateTracker,
    export_ema,
)
from .compat import tf
from .config import to_dict
from .data import augment
from .data.pipeline import make_dataset
from .data.prepare import prepare
from .diffusion import build_diffusion_model
from .distribute import Placement, agree, barrier, make_placement, shard_policy_options, xla_problem
from .errors import ConfigError, Interrupted, RunError, TrainingStopped
from .images import atomic_write_bytes
from .precision import cpu_bfloat16_note
from .runs import RunDir, RunLock
from .samplers import preview_grid, sampler_from_config
from .watchdog import Watchdog

# Keys whose change makes an old checkpoint meaningless for a new config ...
_FROZEN_KEYS = ("model", "diffusion", "data.image_size", "data.channels", "train.precision")
# ... but not these, which change no weight: a run may change them when it resumes.
_RESUMABLE_CHANGES = ("model.recompute",)


def _check_resume_compatible(saved, cfg, run: RunDir) -> None:
    """Refuse to resume a run whose network or process differs from the new config."""
    old, new = to_dict(saved), to_dict(cfg)
    if (saved.train.augment_p > 0) != (cfg.train.augment_p > 0):  # the conditioning is an input of the network
        raise ConfigError(
            f"{run.config_path}: train.augment_p was {saved.train.augment_p:g} in this run, the new config says "
            f"{cfg.train.augment_p:g}, and turning augmentation on or off changes the network; pass --restart to "
            "start the run over, set run.dir to a new folder, or start a new run from this one with --init-from")
    for key in _FROZEN_KEYS:
        section, _, name = key.partition(".")
        for k in [name] if name else list(new[section]):
            if f"{section}.{k}" not in _RESUMABLE_CHANGES and old[section].get(k) != new[section][k]:
                raise ConfigError(
                    f"{run.config_path}: {section}.{k} was {old[section].get(k)!r} in this run, the new config "
                    f"says {new[section][k]!r}; pass --restart to start the run over, or set run.dir to a new folder")


def _check_same_labels(run: RunDir, label_set) -> None:
    """Refuse to resume a run whose classes or tag vocabulary changed: they are inputs of its network."""
    saved = run.load_labels()
    if saved == label_set:
        return

    def describe(ls):
        return "no labels" if ls is None else f"{len(ls)} {'classes' if ls.mode == 'folders' else 'tags'}"

    change = describe(saved) + " -> " + describe(label_set)
    if saved is not None and label_set is not None and saved.mode == label_set.mode:
        added = [n for n in label_set.names if n not in saved.names]
        gone = [n for n in saved.names if n not in label_set.names]
        change += "".join(f"; {what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                          for what, names in (("new", added), ("missing", gone)) if names)
        if not added and not gone:
            change += "; the same names in another order"
    raise ConfigError(f"{run.labels_path}: this run's labels changed ({change}), and they are inputs of its network; "
                      "pass --restart to start the run over, or set run.dir to a new folder")


def _check_written_by(run: RunDir, log) -> None:
    """Training checkpoints hold Keras-version-specific optimizer state: refuse a cross-version resume."""
    path = run.written_by
    if not path.is_file():
        return
    try:
        info = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log(f"{path} is unreadable ({type(exc).__name__}); assuming the checkpoints are from this TensorFlow line")
        return
    keras_version = str(info.get("keras", ""))
    try:
        written_major = compat.keras_major(keras_version)
    except ValueError:
        log(f"{path} names no Keras version ({keras_version!r}); assuming the checkpoints are from this line")
        return
    if written_major != compat.keras_major(compat.KERAS_VERSION):
        raise RunError(
            f"{run.checkpoints}: these checkpoints were written by Keras {keras_version} (TensorFlow "
            f"{info.get('tf')}); this is Keras {compat.KERAS_VERSION}, whose optimizer state differs. Resume with "
            f"that TensorFlow line, or pass --restart. Sampling works on either line (exports/ are portable).")


@contextlib.contextmanager
def _stop_on_signals(state: RunState, echo):
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""
    names = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def handler(signum, frame):
        if state.interrupt and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state.interrupt = names.get(signum, str(signum))
        echo(f"\n{state.interrupt}: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)")

    previous = {s: signal.signal(s, handler) for s in names}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _check_apart(cfg) -> None:
    """Runs and training images live in separate folders: a run inside the data folder would train on its
    own previews, a data folder inside a run would be mixed with its files. Refuse both, naming both."""
    run_dir, data_dir = Path(cfg.run.dir).resolve(), Path(cfg.data.dir).resolve()
    if run_dir == data_dir:
        problem = "are the same folder"
    elif data_dir in run_dir.parents:
        problem = "put the run inside the data folder (it would train on its own previews)"
    elif run_dir in data_dir.parents:
        problem = "put the data folder inside the run"
    else:
        return
    raise ConfigError(f"run.dir {cfg.run.dir} and data.dir {cfg.data.dir} {problem}; keep them in separate "
                      "folders, e.g. runs/NAME and data/NAME")


def _checkpoint_manager(ckpt, run: RunDir, keep: int, log):
    """tf.train.CheckpointManager over RUN/checkpoints; a damaged list of checkpoints (the `checkpoint` state
    file, which TensorFlow cannot parse then) is rebuilt from the checkpoint files on disk, with a warning."""
    state = run.checkpoints / "checkpoint"
    try:
        tf.train.get_checkpoint_state(str(run.checkpoints))
    except Exception as exc:  # noqa: BLE001 - TensorFlow raises anything from UnicodeDecodeError to OpError here
        on_disk = run.checkpoint_prefixes()
        prefixes = [on_disk[step] for step in sorted(on_disk)]
        log(f"{state} is damaged ({type(exc).__name__}); rebuilt it from the {len(prefixes)} checkpoint files there")
        state.unlink()
        if prefixes:
            tf.compat.v1.train.update_checkpoint_state(str(run.checkpoints), prefixes[-1], prefixes)
    return tf.train.CheckpointManager(ckpt, str(run.checkpoints), max_to_keep=keep)


def _checkpoint_candidates(run: RunDir, manager) -> list[str]:
    """Checkpoint prefixes, newest first: those the manager lists, and any complete-looking `ckpt-N.index`
    on disk (a damaged state file lists none)."""
    listed = {int(p.rsplit("-", 1)[1]): p for p in manager.checkpoints if p.rsplit("-", 1)[1].isdigit()}
    prefixes = {**run.checkpoint_prefixes(), **listed}
    return [prefixes[step] for step in sorted(prefixes, reverse=True)]


def _restore_newest_loadable(ckpt, candidates: list[str], run: RunDir, log) -> tuple[str | None, list[str]]:
    """Restore the newest checkpoint that loads; returns (its prefix, the damaged ones skipped)."""
    skipped = []
    for prefix in candidates:
        try:
            ckpt.restore(prefix).assert_existing_objects_matched()
        except (tf.errors.OpError, OSError, ValueError, AssertionError, IndexError, KeyError, RuntimeError) as exc:
            reason = str(getattr(exc, "message", None) or exc).strip().splitlines()[0][:200]
            skipped.append(f"{Path(prefix).name} ({type(exc).__name__}: {reason})")
            continue
        for s in skipped:
            log(f"skipped the damaged checkpoint {s}; resuming from {Path(prefix).name}")
        return prefix, skipped
    if candidates:
        raise RunError(f"{run.checkpoints}: no checkpoint loads: " + "; ".join(skipped)
                       + ". Start over with --restart (deletes this run's checkpoints), or set run.dir to a new folder")
    return None, skipped


def train(cfg, *, restart: bool = False, echo=print, progress_factory=None, log=print) -> RunDir:
    """Train (or resume) the run `cfg.run.dir`; returns its RunDir."""
    _check_apart(cfg)
    placement = make_placement(cfg.train.distribute)  # before any other TensorFlow op (multi_worker needs it)
    if not placement.is_chief:
        return _train_worker(cfg, placement, echo, log)
    run = RunDir(cfg.run.dir)
    run.claim()  # refuses, untouched, a folder that holds anything but a run
    lock = RunLock(run)  # the chief's alone: the other workers of a multi_worker run neither take nor check it
    note = lock.acquire()
    if note:
        log(f"{run.path}: {note}")
    try:
        return _train_locked(cfg, run, restart, placement, echo, progress_factory, log)
    finally:
        lock.release()


def _train_locked(cfg, run: RunDir, restart, placement: Placement, echo, progress_factory, log) -> RunDir:
    _open_run_dir(cfg, run, restart, echo, log)
    images, labels, state = _load_data(cfg, placement, echo)
    label_set = labels.label_set if labels is not None else None
    if run.checkpoint_prefixes():
        _check_same_labels(run, label_set)
    with placement.strategy.scope():
        model, manager, meta = _build_and_restore(cfg, run, state, label_set, placement, echo, log)
    run.save_config(cfg)
    run.save_labels(label_set)
    atomic_write_bytes(run.written_by, yaml.safe_dump(
        {"tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION}).encode("utf-8"))
    epoch, batch = state.position()
    if epoch >= cfg.train.epochs:
        echo(f"{run.path} already has {epoch} of {cfg.train.epochs} epochs; raise train.epochs to go on")
        return run
    bar = progress_factory(total=state.steps_per_epoch * (cfg.train.epochs - epoch) - batch, desc="train") \
        if progress_factory else _NullBar()
    writer = tf.summary.create_file_writer(str(run.tensorboard)) if cfg.run.tensorboard else None
    try:
        callbacks, watchdog = _callbacks(cfg, run, model, manager, meta, images, labels, state, bar, writer,
                                         echo, log)
        with _stop_on_signals(state, echo), watchdog:
            _fit(cfg, model, images, labels, state, placement, callbacks)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return _finish(run, model, manager, state, echo)


def _train_worker(cfg, placement: Placement, echo, log) -> RunDir:
    """A multi_worker run's other workers: the chief's steps in lockstep (every collective of the fit and of each
    checkpoint), restored from run.dir's checkpoints, which they only read; whatever they write (checkpoints,
    exports, progress) goes to a scratch folder removed at the end. Previews, evaluation and logs are the chief's."""
    run = RunDir(cfg.run.dir)
    images, labels, state = _load_data(cfg, placement, echo)
    label_set = labels.label_set if labels is not None else None
    scratch = RunDir(tempfile.mkdtemp(prefix=f"ddpm-{placement.task.replace(' ', '')}-"))
    try:
        with placement.strategy.scope():
            model, manager, meta = _build_and_restore(cfg, run, state, label_set, placement, echo, log,
                                                      writes=scratch)
        watchdog = Watchdog(cfg.run.stall_timeout, "train", "step", start=int(model.optimizer.iterations.numpy()))
        callbacks = [Heartbeat(watchdog), StateTracker(state),
                     Checkpointer(scratch, manager, state, cfg.run.checkpoint_every, cfg.run.keep_last, model.ema_net,
                                  meta, eval_every=cfg.train.eval_every)]
        with _stop_on_signals(state, echo), watchdog:
            _fit(cfg, model, images, labels, state, placement, callbacks)
    finally:
        shutil.rmtree(scratch.path, ignore_errors=True)
    echo(f"{placement.task}: done at step {int(model.optimizer.iterations.numpy())}; the chief wrote {run.path}")
    return run


def _open_run_dir(cfg, run: RunDir, restart: bool, echo, log) -> None:
    """Sweep what a killed write left, start over when asked, and check that a resume is possible."""
    for p in run.remove_partial_files():
        log(f"removed {p}, left by an interrupted write")
    if restart:
        removed = run.remove_written()
        echo(f"--restart: removed {len(removed)} files of the previous run in {run.path} (samples/ is kept)")
    if run.checkpoint_prefixes():
        _check_resume_compatible(run.load_config(), cfg, run)
        _check_written_by(run, log)


def _load_data(cfg, placement: Placement, echo):
    """The prepare step of `ddpm prepare` (cheap when the cache is fresh), then (images, labels or None,
    RunState). Workers started together prepare one after another: the chief first, the others once it is done
    (on a shared folder they find its cache fresh; on their own disks each prepares its own copy)."""
    if not placement.is_chief:
        barrier(placement)
    prepared = prepare(cfg.data, echo=echo, only_changes=True)
    if placement.is_chief:
        barrier(placement)
    images, labels = prepared.images(cfg.data.memory_mb), prepared.labels
    global_batch = cfg.train.images_per_step * placement.replicas
    state = RunState(len(images), global_batch, cfg.train.precision)
    echo(placement.describe(cfg.train.batch_size, cfg.train.accumulate))
    echo(f"data: {len(images)} images from {cfg.data.dir} ({len(prepared.files) - len(images)} skipped, "
         f"{'memory-mapped' if not isinstance(images, np.ndarray) else 'in memory'}), "
         f"{state.steps_per_epoch} steps per epoch at batch {global_batch}"
         + (f" ({cfg.train.accumulate} accumulated micro-batches of {cfg.train.batch_size})"
            if cfg.train.accumulate > 1 and placement.replicas == 1 else ""))
    if labels is not None:
        ls = labels.label_set
        echo(f"labels: {len(ls)} {'classes' if ls.mode == 'folders' else 'tags'} ({cfg.data.labels}), "
             f"{labels.unlabelled()} unlabelled images, label dropout {cfg.train.label_dropout:g} for guidance")
    if cfg.train.augment_p > 0:
        echo(f"augmentation: each of x-flip, integer translation, scaling, rotation and anisotropic scaling with "
             f"probability {cfg.train.augment_p:g}, told to the network ({augment.DIM} values, zero when sampling)")
    return images, labels, state


def _build_and_restore(cfg, run: RunDir, state: RunState, label_set, placement: Placement, echo, log,
                       writes: RunDir | None = None):
    """The networks and optimizer, restored from the newest checkpoint that loads: (model, manager, meta). Called
    in the strategy's scope. A multi_worker run's other workers read `run` and write to `writes`, their scratch."""
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    model, xla = build_diffusion_model(cfg, seed=cfg.train.seed, num_labels=len(label_set) if label_set else 0)
    net, optimizer = model.net, model.optimizer
    compat.build_optimizer(optimizer, net.trainable_variables)
    echo(f"model: {net.count_params():,} parameters, TensorFlow {compat.TF_VERSION} "
         f"(Keras {compat.KERAS_VERSION}), {cfg.train.precision}, XLA {'on' if xla else 'off'}")
    if note := cpu_bfloat16_note(cfg.train.precision):
        echo(f"note: {note}")
    if cfg.train.jit_compile == "true" and not xla and (why := xla_problem()):
        echo(f"note: train.jit_compile is true, but the train step runs without XLA: {why}")
    ckpt = tf.train.Checkpoint(net=net, ema=model.ema_net, optimizer=optimizer, rng=model.rng,
                               ema_updates=model.ema_updates, epoch=state.epoch, batch_in_epoch=state.batch,
                               global_batch=state.global_batch)
    meta = {"config": to_dict(cfg), "tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION,
            "labels": label_set.to_dict() if label_set else None}
    if writes is None:
        manager = _checkpoint_manager(ckpt, run, cfg.run.keep_last, log)
        candidates = _checkpoint_candidates(run, manager)
    else:
        manager = tf.train.CheckpointManager(ckpt, str(writes.checkpoints), max_to_keep=cfg.run.keep_last)
        candidates = [p for _, p in sorted(run.checkpoint_prefixes().items(), reverse=True)]
    restored, skipped = _restore_newest_loadable(ckpt, candidates, run, log)
    step = int(optimizer.iterations.numpy())
    if not agree(placement, step):
        raise RunError(f"{placement.task}: the workers resumed {run.path} from different steps (this one from "
                       f"{step}); every worker must see the same run.dir (one shared folder, e.g. on NFS)")
    state.rebase()
    if restored and writes is None:
        _sync_exports(run, model.ema_net, step, meta, state, keep_later=bool(skipped))
        epoch, batch = state.position()
        echo(f"resuming {run.path} from step {step} (epoch {epoch}" + (f", batch {batch})" if batch else ")"))
    elif cfg.train.init_from and not restored:
        meta["init_from"] = _warm_start(cfg, run, model, echo)
    return model, manager, meta


def _warm_start(cfg, run: RunDir, model, echo) -> dict:
    """A new run's first weights from train.init_from (both the network and its EMA copy); where it started."""
    from .warm_start import find_source, warm_start

    source = find_source(cfg.train.init_from, run)
    note = warm_start([model.net, model.ema_net], source)
    echo(f"initialised from {source.run} at step {source.step} (its EMA weights); fresh optimizer and step "
         "counter" + (f"; {note}" if note else ""))
    return {"run": str(source.run), "step": source.step}


def _callbacks(cfg, run: RunDir, model, manager, meta, images, labels, state: RunState, bar, writer, echo, log):
    """The periodic work of the fit, and the stall watchdog its first callback beats after every step."""
    ema_net, size, channels = model.ema_net, cfg.data.image_size, cfg.data.channels
    label_set = labels.label_set if labels is not None else None
    progress = Progress(state, bar)
    # DDIM with eta 1 (stochastic): clean previews in 50 steps even early in training, where the
    # deterministic eta 0 shows grainy textures.
    preview_sampler = sampler_from_config(ema_net, cfg, "ddim", 50, eta=1.0, spacing="linspace")
    # With labels, one row per class (or tag): the same seeds in every row, so rows differ by label only.
    preview_seeds, preview_labels, cols = preview_grid(label_set, cfg.run.preview_seed, cfg.run.preview_n)
    watchdog = Watchdog(cfg.run.stall_timeout, "train", "step", start=int(model.optimizer.iterations.numpy()))
    callbacks = [Heartbeat(watchdog), StateTracker(state), progress,
                 ProgressFile(run, state, progress, state.steps_per_epoch * cfg.train.epochs),
                 Logger(run, state, progress, writer, cfg.train),
                 Checkpointer(run, manager, state, cfg.run.checkpoint_every, cfg.run.keep_last, ema_net, meta,
                              eval_every=cfg.train.eval_every),
                 Preview(run, state, preview_sampler, preview_seeds, (size, size, channels),
                         cfg.run.preview_every, writer, labels=preview_labels, cols=cols)]
    if cfg.train.eval_every:
        from .evaluation.command import TrainingEval

        in_memory = images if isinstance(images, np.ndarray) else images.load()  # the features need every image
        callbacks.append(Evaluate(state, TrainingEval(run, cfg, ema_net, in_memory, writer, log, labels),
                                  cfg.train.eval_every, echo, run))
    return callbacks, watchdog


def _fit(cfg, model, images, labels, state: RunState, placement: Placement, callbacks) -> None:
    """A partial epoch first when resuming mid-epoch, then whole epochs (data order: seed and epoch). Batches are
    global: under a strategy Keras hands each replica its contiguous part."""
    epoch, batch = state.position()
    matrix = labels.matrix if labels is not None else None

    def dataset(start_epoch, skip_images=0):
        ds = make_dataset(images, state.batch_size, cfg.train.seed, start_epoch, cfg.data.flip,
                          skip_images=skip_images, labels=matrix, augment_p=cfg.train.augment_p)
        return ds.with_options(shard_policy_options()) if placement.workers > 1 else ds

    with _peers_lost(placement, cfg.run.dir):
        if batch:
            model.fit(dataset(epoch, state.skip_images), epochs=epoch + 1, initial_epoch=epoch,
                      steps_per_epoch=state.steps_per_epoch - batch, callbacks=callbacks, verbose=0, shuffle=False)
        epoch, batch = state.position()
        if not batch and epoch < cfg.train.epochs and not (state.interrupt or state.nonfinite_step):
            model.fit(dataset(epoch), epochs=cfg.train.epochs, initial_epoch=epoch,
                      steps_per_epoch=state.steps_per_epoch, callbacks=callbacks, verbose=0, shuffle=False)


@contextlib.contextmanager
def _peers_lost(placement: Placement, run_dir):
    """A multi_worker step whose collectives fail (a worker killed, a machine unreachable, the collective timeout)
    ends training with one line: every step is in lockstep, so none can go on; the newest checkpoint is whole."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError) as exc:  # what a collective raises when a peer is gone or too late
        if placement.workers == 1:
            raise
        lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()]
        reason = next((line for line in lines if "aborted" in line.lower() or "unavailable" in line.lower()),
                      lines[0] if lines else "")[:200]
        raise TrainingStopped(
            f"a worker of this multi_worker run is gone or unreachable ({type(exc).__name__}: {reason}); the newest "
            f"checkpoint in {run_dir}/checkpoints is whole: start every worker again to resume (or resume on one "
            "machine with --set train.distribute=none)") from None


def _finish(run: RunDir, model, manager, state: RunState, echo) -> RunDir:
    """Say how the fit ended: done, interrupted (saved), or stopped by a non-finite loss."""
    step = int(model.optimizer.iterations.numpy())
    if state.nonfinite_step is not None:
        raise TrainingStopped(
            f"the loss became NaN or infinite at step {state.nonfinite_step}; training stopped and nothing of "
            f"that step was saved (the newest checkpoint is {manager.latest_checkpoint or 'none'}). Likely "
            "causes: a learning rate too high (train.learning_rate, or add train.warmup_steps), no gradient "
            "clipping (train.grad_clip), or float16 overflow (use mixed_bfloat16 or float32).")
    if state.interrupt:
        echo(f"stopped by {state.interrupt} at step {step}; saved {manager.latest_checkpoint}. "
             f"Resume with the same command: ddpm train --config ... (run.dir {run.path})")
        raise Interrupted(state.interrupt)
    label_set = run.load_labels()
    how = {None: "--n 64", "folders": "--class all --n 8", "tags": '--tags "TAG, TAG"'}[
        label_set.mode if label_set else None]
    echo(f"done: {run.path} at epoch {state.position()[0]}, step {step}; sample with `ddpm sample --run {run.path} {how}`")
    return run


def _sync_exports(run: RunDir, ema_net, step: int, meta: dict, state: RunState, keep_later: bool) -> None:
    """After a restore: drop exports from after the checkpoint (an abandoned future; but `keep_later` when
    a damaged newer checkpoint was skipped, whose export may be the best weights there are, replaced as training
    passes that step again) and make sure the restored step has its export (a kill between checkpoint and
    export leaves it missing)."""
    for s, path in run.export_paths().items():
        if s > step and not keep_later:
            path.unlink(missing_ok=True)
    if step not in run.export_paths():
        epoch, batch = state.position()
        export_ema(run, ema_net, step, {**meta, "epoch": epoch, "batch_in_epoch": batch})


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass
