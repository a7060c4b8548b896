"""Numeric precision and XLA: the choices config and CLI offer, the Keras dtype policy, when to use XLA.

TensorFlow-free at import (config.py and cli.py read the lists): TF is imported inside the functions.
The optimizer that goes with a precision (loss scaling for float16) is built in diffusion.make_optimizer.
"""

from __future__ import annotations

import os

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_MODES = ("auto", "true", "false")  # train.jit_compile: see use_xla


def apply_policy(precision: str, bf16_mode: str = "auto") -> None:
    """Set the global precision before any network is built.

    `mixed_bfloat16` on a CPU: Keras's policy runs every layer in bfloat16, and TensorFlow's element-wise
    bfloat16 kernels on the CPU are slow (the reference trained 1.8x slower that way). Instead, keep the
    graph in float32 and let grappler's oneDNN auto-mixed-precision pass run the convolutions, matmuls
    and their gradients in bfloat16 (AMX/AVX-512), with the casts it needs. On a GPU, Keras's policy.
    `bf16_mode` ('auto', 'keras', 'onednn') forces one or the other, for measurements.
    Where the pass cannot run (see cpu_bfloat16_note), the CPU trains in float32 rather than fail.
    """
    from .compat import keras, tf

    assert precision in PRECISIONS, precision
    onednn = precision == "mixed_bfloat16" and (
        bf16_mode == "onednn" or (bf16_mode == "auto" and not tf.config.list_physical_devices("GPU")))
    tf.config.optimizer.set_experimental_options(
        {"auto_mixed_precision_onednn_bfloat16": onednn and cpu_bfloat16_note(precision) is None})
    keras.mixed_precision.set_global_policy("float32" if onednn else precision)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them (/proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_bfloat16_note(precision: str) -> str | None:
    """Why mixed_bfloat16 trains in float32 on this CPU, or None when it does not.

    TensorFlow 2.10's oneDNN (2.6) has bfloat16 kernels only from AVX-512 up; on an AVX2-only CPU with oneDNN
    on (TF_ENABLE_ONEDNN_OPTS=1) its bfloat16 pass rewrites convolutions into fused ops that have no bfloat16
    kernel, and the first step fails ("Value for attr 'T' of bfloat16 is not in the list of allowed values").
    There the pass stays off. The newest line checks the CPU itself and leaves such a graph in float32.
    """
    from .compat import TF_VERSION, tf

    if precision != "mixed_bfloat16" or tf.config.list_physical_devices("GPU"):
        return None
    flags = cpu_flags()
    if flags is None or "avx512f" in flags:
        return None
    if tuple(map(int, TF_VERSION.split(".")[:2])) >= (2, 11) or os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "1":
        return ("this CPU has no AVX-512, so TensorFlow runs mixed_bfloat16's convolutions in float32 "
                "(bfloat16 needs AVX-512 or AMX on a CPU, or a GPU)")
    return ("this CPU has no AVX-512, and TensorFlow 2.10's oneDNN has no bfloat16 kernels below it: "
            "mixed_bfloat16 trains in float32 here (bfloat16 needs AVX-512 or AMX on a CPU, or a GPU)")


def use_xla(jit_compile: str) -> bool:
    """`auto`: XLA on GPUs (usually faster there), off on CPUs (measured slower on CPUs here)."""
    from .compat import tf

    assert jit_compile in JIT_MODES, jit_compile
    if jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return jit_compile == "true"
