"""Numeric precision: the Keras dtype policy and the optimizer that goes with it (loss scaling for float16)."""

from __future__ import annotations

from . import compat
from .compat import keras, tf

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def apply_policy(precision: str) -> None:
    """Set the global Keras dtype policy before any network is built."""
    assert precision in PRECISIONS, precision
    keras.mixed_precision.set_global_policy(precision)


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear learning-rate warm-up from lr / warmup_steps to lr, then constant (DDPM: 5,000 steps on CIFAR-10)."""

    def __init__(self, learning_rate: float, warmup_steps: int):
        self.learning_rate, self.warmup_steps = float(learning_rate), int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        return self.learning_rate * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


def make_optimizer(train_cfg):
    """Adam with optional warm-up; float16 gets dynamic loss scaling (bfloat16 needs none)."""
    lr = train_cfg.learning_rate
    if train_cfg.warmup_steps > 0:
        lr = WarmupSchedule(lr, train_cfg.warmup_steps)
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    if train_cfg.precision == "mixed_float16":
        optimizer = compat.loss_scale_optimizer(optimizer)
    return optimizer
