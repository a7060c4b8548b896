"""Keras callbacks for the periodic work of a run: state, progress (a bar and progress.json), logs, checkpoints +
exports, previews."""

from __future__ import annotations

import json
import math
import os
import time

from . import compat
from .compat import keras, tf
from .diffusion import ema_decay_at
from .errors import TrainingStopped
from .evaluation import curve
from .images import atomic_write_bytes, make_grid, save_png, to_uint8
from .runs import RunDir, append_csv_row, save_weights
from .summaries import image_summary, scalar_summary


def _float(value) -> float:
    return float(value.numpy() if hasattr(value, "numpy") else value)


class RunState:
    """Where a run stands: completed epochs and batches of the current epoch (both checkpointed), plus
    why training was asked to stop (an interrupt signal or a non-finite loss)."""

    def __init__(self, num_images: int, batch_size: int, precision: str):
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_in_epoch")
        # Images per step when the checkpoint was written (0: a checkpoint from before it was recorded), so a
        # resume at another global batch (another number of replicas, another batch_size) continues the epoch at
        # the same image.
        self.global_batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_batch")
        self.skip_images = 0  # images of the current epoch trained before this process started
        self.num_images, self.batch_size = num_images, batch_size
        self.steps_per_epoch = math.ceil(num_images / batch_size)
        self.loss_scaled = precision == "mixed_float16"
        self.interrupt: str | None = None  # set by the signal handler
        self.nonfinite_step: int | None = None
        self.last_loss = float("nan")

    def position(self) -> tuple[int, int]:
        return int(self.epoch.numpy()), int(self.batch.numpy())

    def due(self, epoch: int, every: int) -> int | None:
        """The completed epoch count when periodic work every `every` epochs is due at the end of Keras
        epoch `epoch`, else None: not on a partial (interrupted) epoch, not after a non-finite loss."""
        completed = int(self.epoch.numpy())
        if not every or completed != epoch + 1 or completed % every or self.nonfinite_step is not None:
            return None
        return completed

    def rebase(self) -> None:
        """After a restore: count the current epoch's batches in this run's global batch. A checkpoint written
        at another global batch continues at the same image: the epoch's rest is skip_images in, its batches
        numbered so that the epoch still ends at steps_per_epoch."""
        saved = int(self.global_batch.numpy()) or self.batch_size
        self.global_batch.assign(self.batch_size)
        batch = int(self.batch.numpy())
        if saved == self.batch_size or not batch:
            self.skip_images = batch * self.batch_size
            return
        self.skip_images = min(batch * saved, self.num_images)
        self.batch.assign(self.steps_per_epoch - math.ceil((self.num_images - self.skip_images) / self.batch_size))

    def images_in_next_batch(self) -> int:
        if int(self.batch.numpy()) < self.steps_per_epoch - 1:
            return self.batch_size
        left = self.num_images - self.skip_images  # the epoch's last batch takes what the others left
        return left - (math.ceil(left / self.batch_size) - 1) * self.batch_size


class StateTracker(keras.callbacks.Callback):
    """Advances the run state after each batch and stops training on an interrupt or a non-finite loss.

    Under mixed_float16 a non-finite step is the loss scaler's business (it skips the update and lowers
    the scale); only a long run of them stops training.
    """

    MAX_SKIPPED_FLOAT16 = 50

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state
        self._skipped = 0

    def on_train_batch_end(self, batch, logs=None):
        state = self.state
        loss = _float((logs or {}).get("step_loss", float("nan")))
        step = int(self.model.optimizer.iterations.numpy())
        if not math.isfinite(loss):
            self._skipped += 1
            if not state.loss_scaled or self._skipped > self.MAX_SKIPPED_FLOAT16:
                state.nonfinite_step = step
                self.model.stop_training = True
                return
        else:
            self._skipped = 0
            state.last_loss = loss
        state.batch.assign_add(1)
        if state.interrupt:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        state = self.state
        if int(state.batch.numpy()) >= state.steps_per_epoch:  # not on an interrupted, partial epoch
            state.epoch.assign(epoch + 1)
            state.batch.assign(0)
            state.skip_images = 0


class Heartbeat(keras.callbacks.Callback):
    """Tells the stall watchdog (watchdog.Watchdog) that a step finished."""

    def __init__(self, watchdog):
        super().__init__()
        self.watchdog = watchdog

    def on_train_batch_end(self, batch, logs=None):
        self.watchdog.beat()


class Progress(keras.callbacks.Callback):
    """A tqdm bar over all remaining steps with loss, images per second and ETA."""

    def __init__(self, state: RunState, bar):
        super().__init__()
        self.state, self.bar = state, bar
        self.images_per_s = 0.0
        self._t0, self._seen = None, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_images = self.state.images_in_next_batch()

    def on_train_batch_end(self, batch, logs=None):
        if self._t0 is None:  # the clock starts after the first step, which traces the graph
            self._t0 = time.perf_counter()
        else:
            self._seen += self._batch_images
            elapsed = time.perf_counter() - self._t0
            self.images_per_s = self._seen / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix(loss=f"{self.state.last_loss:.4f}", img_s=f"{self.images_per_s:.1f}", refresh=False)
        self.bar.update(1)


class ProgressFile(keras.callbacks.Callback):
    """RUN/progress.json, rewritten at most every `every` seconds and when a fit ends: step, total steps, epoch,
    loss, images/s, ETA and status (training, done, stopped, failed), so a page that did not start the trainer,
    or was closed and reopened, shows where it stands."""

    def __init__(self, run: RunDir, state: RunState, progress: Progress, total_steps: int, every: float = 2.0):
        super().__init__()
        self.run, self.state, self.progress = run, state, progress
        self.total_steps, self.every = total_steps, every
        self._written, self._clock = 0.0, None  # (time, step) after the first step, which traces the graph

    def on_train_batch_end(self, batch, logs=None):
        now, step = time.monotonic(), int(self.model.optimizer.iterations.numpy())
        if self._clock is None:
            self._clock = (now, step)
        if now - self._written >= self.every:
            self._write("training", now, step)

    def on_train_end(self, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        status = "stopped" if self.state.interrupt else "failed" if self.state.nonfinite_step is not None \
            else "done" if step >= self.total_steps else "training"
        self._write(status, time.monotonic(), step)

    def _write(self, status: str, now: float, step: int) -> None:
        t0, step0 = self._clock or (now, step)
        rate = (step - step0) / (now - t0) if now > t0 and step > step0 else None
        remaining = max(0, self.total_steps - step)
        body = {"status": status, "pid": os.getpid(), "step": step, "total_steps": self.total_steps,
                "epoch": int(self.state.epoch.numpy()), "loss": self.state.last_loss if math.isfinite(
                    self.state.last_loss) else None, "images_per_s": round(self.progress.images_per_s, 2),
                "eta_seconds": round(remaining / rate, 1) if rate else None,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            atomic_write_bytes(self.run.progress_path, json.dumps(body).encode("utf-8"))
        except OSError:
            pass  # a full disk is the checkpointer's to report; this file is only a display
        self._written = now


class Logger(keras.callbacks.Callback):
    """metrics.csv (one row per completed epoch) and TensorBoard scalars every `every` steps."""

    def __init__(self, run: RunDir, state: RunState, progress: Progress, writer, train_cfg, every: int = 10):
        super().__init__()
        self.run, self.state, self.progress, self.writer = run, state, progress, writer
        self.train_cfg, self.every = train_cfg, every

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self._scalars(step)

    def _scalars(self, step: int) -> None:
        if self.writer is None or self.state.nonfinite_step is not None:
            return
        ema_step = self.model.ema_updates
        with self.writer.as_default():
            scalar_summary("loss", self.state.last_loss, step)
            scalar_summary("learning_rate", compat.current_learning_rate(self.model.optimizer), step)
            scalar_summary("images_per_s", self.progress.images_per_s, step)
            scalar_summary("ema_decay", ema_decay_at(ema_step, self.train_cfg.ema_decay,
                                                     self.train_cfg.ema_warmup), step)

    def on_epoch_end(self, epoch, logs=None):
        if int(self.state.epoch.numpy()) != epoch + 1:
            return  # interrupted mid-epoch: no row for a partial epoch
        opt = self.model.optimizer
        self._scalars(int(opt.iterations.numpy()))
        row = {"epoch": epoch + 1, "step": int(opt.iterations.numpy()), "loss": f"{_float(logs['loss']):.6f}",
               "learning_rate": f"{_float(compat.current_learning_rate(opt)):.3g}",
               "images_per_s": f"{self.progress.images_per_s:.2f}",
               "seconds": f"{time.perf_counter() - self._t0:.2f}", "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_csv_row(self.run.metrics_csv, row)
        if self.writer is not None:
            self.writer.flush()


class Checkpointer(keras.callbacks.Callback):
    """Every N epochs, at every in-training evaluation (`eval_every`, so each evaluated step has its export), and
    wherever training stops cleanly: checkpoint everything, then export the EMA. The newest `keep` exports are
    kept, and the one whose samples scored the lowest KID (evaluation/curve.py)."""

    def __init__(self, run: RunDir, manager, state: RunState, every: int, keep: int, ema_net, meta: dict,
                 eval_every: int = 0):
        super().__init__()
        self.run, self.manager, self.state = run, manager, state
        self.every, self.keep, self.ema_net, self.meta = every, keep, ema_net, meta
        self.eval_every = eval_every
        self.last_saved = None
        # Test hook: seconds to pause between the checkpoint and its export, so a test can kill the
        # process in the middle of a save.
        self._pause_in_save = float(os.environ.get("DDPM_TF_TEST_PAUSE_IN_SAVE", "0"))

    def save(self) -> int:
        step = int(self.model.optimizer.iterations.numpy())
        epoch, batch = self.state.position()
        try:
            # The manager writes to temporary names and updates its state file last, so the newest
            # complete checkpoint stays the one it lists until this one is whole.
            self.manager.save(checkpoint_number=step)
            if self._pause_in_save:
                time.sleep(self._pause_in_save)
            export_ema(self.run, self.ema_net, step, {**self.meta, "epoch": epoch, "batch_in_epoch": batch})
        except (OSError, tf.errors.OpError) as exc:
            latest = self.manager.latest_checkpoint
            raise TrainingStopped(
                f"could not write the checkpoint of step {step} to {self.run.checkpoints} ({exc}). "
                f"The previous checkpoint ({latest or 'none'}) is intact; free disk space and run the same "
                f"command to resume.") from None
        top = curve.best(curve.training_points(self.run.eval_csv))
        self.run.prune_exports(self.keep, also={top.step} if top else ())
        self.last_saved = (epoch, batch)
        return step

    def on_epoch_end(self, epoch, logs=None):
        if self.state.due(epoch, self.every) is not None or self.state.due(epoch, self.eval_every) is not None:
            self.save()

    def on_train_end(self, logs=None):
        if self.state.nonfinite_step is None and self.last_saved != self.state.position():
            self.save()


def export_ema(run: RunDir, ema_net, step: int, meta: dict) -> None:
    """Write RUN/exports/ema-STEP.npz (atomic)."""
    save_weights(ema_net, run.export_path(step), {**meta, "step": step})


class Preview(keras.callbacks.Callback):
    """Every N epochs: a grid from the EMA weights with fixed seeds, so the user watches the same faces form."""

    def __init__(self, run: RunDir, state: RunState, sampler, seeds, image_shape, every: int, writer=None,
                 labels=None, cols: int | None = None):
        super().__init__()
        self.run, self.state, self.sampler, self.seeds = run, state, sampler, seeds
        self.image_shape, self.every, self.writer = image_shape, every, writer
        self.labels, self.cols = labels, cols  # a run with labels: one row of the grid per class or tag

    def on_epoch_end(self, epoch, logs=None):
        completed = self.state.due(epoch, self.every)
        if completed is None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        grid = make_grid(to_uint8(self.sampler(self.seeds, self.image_shape, labels=self.labels)), cols=self.cols)
        path = save_png(self.run.previews / f"preview-epoch{completed:05d}-step{step:08d}.png", grid,
                        {"ddpm_tf:step": step, "ddpm_tf:epoch": completed})
        atomic_write_bytes(self.run.previews / "latest.png", path.read_bytes())
        if self.writer is not None:
            with self.writer.as_default():
                image_summary("preview", grid, path.read_bytes(), step)


class Evaluate(keras.callbacks.Callback):
    """Every N epochs: KID/FID of the EMA weights' samples (`evaluate(step, epoch)`), shown beside the loss with
    the best step so far (from the run's eval.csv, when `run` is given)."""

    def __init__(self, state: RunState, evaluate, every: int, echo=print, run: RunDir | None = None):
        super().__init__()
        self.state, self.evaluate, self.every, self.echo, self.run = state, evaluate, every, echo, run

    def on_epoch_end(self, epoch, logs=None):
        completed = self.state.due(epoch, self.every)
        if completed is None:
            return
        result = self.evaluate(int(self.model.optimizer.iterations.numpy()), completed)
        line = (f"epoch {completed}: KID {result.kid_mean:.4f} +- {result.kid_std:.4f}, FID {result.fid:.1f}, "
                f"near-copies {100 * result.memorization.share:.1f} %")
        best_so_far = curve.summary(curve.training_points(self.run.eval_csv)) if self.run is not None else ""
        self.echo(line + (f"; {best_so_far}" if best_so_far else ""))
