"""Numeric precision: the Keras dtype policy and the optimizer that goes with it (loss scaling for float16)."""

from __future__ import annotations

from . import compat
from .compat import keras, tf

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def apply_policy(precision: str, bf16_mode: str = "auto") -> str:
    """Set the global precision before any network is built; returns a description of what was set.

    `mixed_bfloat16` on a CPU: Keras's policy runs every layer in bfloat16, and TensorFlow's element-wise
    bfloat16 kernels on the CPU are slow (the reference trained 1.8x slower that way). Instead, keep the
    graph in float32 and let grappler's oneDNN auto-mixed-precision pass run the convolutions, matmuls
    and their gradients in bfloat16 (AMX/AVX-512), with the casts it needs. On a GPU, Keras's policy.
    `bf16_mode` ('auto', 'keras', 'onednn') forces one or the other, for measurements.
    """
    assert precision in PRECISIONS, precision
    onednn = precision == "mixed_bfloat16" and (
        bf16_mode == "onednn" or (bf16_mode == "auto" and not tf.config.list_physical_devices("GPU")))
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": onednn})
    keras.mixed_precision.set_global_policy("float32" if onednn else precision)
    return "float32 graph, bfloat16 convolutions and matmuls (oneDNN AMP)" if onednn else precision


def use_xla(jit_compile: str) -> bool:
    """`auto`: XLA on GPUs (usually faster there), off on CPUs (measured slower on CPUs here)."""
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return jit_compile == "true"


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
    optimizer = compat.adam(lr)
    if train_cfg.precision == "mixed_float16":
        optimizer = compat.loss_scale_optimizer(optimizer)
    return optimizer
