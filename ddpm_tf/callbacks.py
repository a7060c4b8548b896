"""Keras callbacks for the periodic work of a run: progress, metrics.csv, checkpoints + exports, previews."""

from __future__ import annotations

import csv
import time

from .compat import keras, tf
from .images import atomic_write_bytes, make_grid, save_png, to_uint8
from .runs import RunDir, save_weights


def _float(value) -> float:
    return float(value.numpy() if hasattr(value, "numpy") else value)


class Progress(keras.callbacks.Callback):
    """A tqdm bar over all remaining steps with loss, images per second and ETA."""

    def __init__(self, total_steps: int, batch_size: int, num_images: int, steps_per_epoch: int, bar):
        super().__init__()
        self.bar, self.batch_size, self.num_images = bar, batch_size, num_images
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.images_per_s = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self._t0, self._seen = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        # The last batch of an epoch holds the remainder of the images.
        last = batch == self.steps_per_epoch - 1
        self._seen += self.num_images - batch * self.batch_size if last else self.batch_size
        elapsed = time.perf_counter() - self._t0
        self.images_per_s = self._seen / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix(loss=f"{_float(logs.get('step_loss', float('nan'))):.4f}",
                             img_s=f"{self.images_per_s:.1f}", refresh=False)
        self.bar.update(1)


class MetricsCSV(keras.callbacks.Callback):
    """Appends one row per epoch to RUN/metrics.csv (created with a header when missing)."""

    FIELDS = ["epoch", "step", "loss", "learning_rate", "images_per_s", "seconds", "time"]

    def __init__(self, run: RunDir, progress: Progress):
        super().__init__()
        self.run, self.progress = run, progress

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        row = {"epoch": epoch + 1, "step": int(opt.iterations.numpy()),
               "loss": f"{_float(logs['loss']):.6f}",
               "learning_rate": f"{_float(opt.learning_rate):.3g}",
               "images_per_s": f"{self.progress.images_per_s:.2f}",
               "seconds": f"{time.perf_counter() - self._t0:.2f}",
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        new = not self.run.metrics_csv.exists()
        with open(self.run.metrics_csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


class Checkpointer(keras.callbacks.Callback):
    """Every N epochs (and at the end): checkpoint everything, export the EMA weights, prune old ones."""

    def __init__(self, run: RunDir, manager, epoch_var, every: int, keep: int, ema_net, meta: dict, echo):
        super().__init__()
        self.run, self.manager, self.epoch_var = run, manager, epoch_var
        self.every, self.keep, self.ema_net, self.meta, self.echo = every, keep, ema_net, meta, echo
        self.last_saved_epoch = None

    def save(self, epoch: int) -> None:
        self.epoch_var.assign(epoch)
        step = int(self.model.optimizer.iterations.numpy())
        # Export first: a checkpoint is only announced once the export beside it exists.
        save_weights(self.ema_net, self.run.exports / f"ema-{step:08d}.npz", {**self.meta, "step": step,
                                                                              "epoch": epoch})
        self.manager.save(checkpoint_number=step)
        self.run.prune_exports(self.keep)
        self.last_saved_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            self.save(epoch + 1)

    def on_train_end(self, logs=None):
        epoch = int(self.epoch_var.numpy())
        done = getattr(self.model, "_ddpm_epochs_done", epoch)
        if self.last_saved_epoch != done:
            self.save(done)


class EpochCounter(keras.callbacks.Callback):
    """Remembers how many epochs are complete (for the final checkpoint)."""

    def on_epoch_end(self, epoch, logs=None):
        self.model._ddpm_epochs_done = epoch + 1


class Preview(keras.callbacks.Callback):
    """Every N epochs: a grid from the EMA weights with fixed seeds, so the user watches the same faces form."""

    def __init__(self, run: RunDir, sampler, seeds, image_shape, every: int, echo, writer=None):
        super().__init__()
        self.run, self.sampler, self.seeds, self.image_shape = run, sampler, seeds, image_shape
        self.every, self.echo, self.writer = every, echo, writer

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0:
            step = int(self.model.optimizer.iterations.numpy())
            grid = make_grid(to_uint8(self.sampler(self.seeds, self.image_shape)))
            path = save_png(self.run.previews / f"preview-epoch{epoch + 1:05d}-step{step:08d}.png", grid,
                            {"ddpm_tf:step": step, "ddpm_tf:epoch": epoch + 1})
            atomic_write_bytes(self.run.previews / "latest.png", path.read_bytes())
            if self.writer is not None:
                with self.writer.as_default():
                    tf.summary.image("preview", grid[None], step=step)
