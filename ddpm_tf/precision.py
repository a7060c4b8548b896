"""Numeric precision: the Keras dtype policy and the optimizer that goes with it (loss scaling for float16)."""

from __future__ import annotations

from . import compat
from .compat import keras

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def apply_policy(precision: str) -> None:
    """Set the global Keras dtype policy before any network is built."""
    assert precision in PRECISIONS, precision
    keras.mixed_precision.set_global_policy(precision)


def make_optimizer(train_cfg):
    """Adam at the configured learning rate; float16 gets dynamic loss scaling (bfloat16 needs none)."""
    optimizer = keras.optimizers.Adam(learning_rate=train_cfg.learning_rate)
    if train_cfg.precision == "mixed_float16":
        optimizer = compat.loss_scale_optimizer(optimizer)
    return optimizer
