"""Numeric precision and XLA: the choices config and CLI offer, the Keras dtype policy, when to use XLA.

TensorFlow-free at import (config.py and cli.py read the lists): TF is imported inside the functions.
The optimizer that goes with a precision (loss scaling for float16) is built in diffusion.make_optimizer.
"""

from __future__ import annotations

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_MODES = ("auto", "true", "false")  # train.jit_compile: see use_xla


def apply_policy(precision: str, bf16_mode: str = "auto") -> None:
    """Set the global precision before any network is built.

    `mixed_bfloat16` on a CPU: Keras's policy runs every layer in bfloat16, and TensorFlow's element-wise
    bfloat16 kernels on the CPU are slow (the reference trained 1.8x slower that way). Instead, keep the
    graph in float32 and let grappler's oneDNN auto-mixed-precision pass run the convolutions, matmuls
    and their gradients in bfloat16 (AMX/AVX-512), with the casts it needs. On a GPU, Keras's policy.
    `bf16_mode` ('auto', 'keras', 'onednn') forces one or the other, for measurements.
    """
    from .compat import keras, tf

    assert precision in PRECISIONS, precision
    onednn = precision == "mixed_bfloat16" and (
        bf16_mode == "onednn" or (bf16_mode == "auto" and not tf.config.list_physical_devices("GPU")))
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": onednn})
    keras.mixed_precision.set_global_policy("float32" if onednn else precision)


def use_xla(jit_compile: str) -> bool:
    """`auto`: XLA on GPUs (usually faster there), off on CPUs (measured slower on CPUs here)."""
    from .compat import tf

    assert jit_compile in JIT_MODES, jit_compile
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return jit_compile == "true"
