"""Every difference between TF 2.10 (Keras 2) and the newest TF (Keras 3), and nothing else.

The rest of the package imports `tf` and `keras` from here and never branches on versions itself.
"""

from __future__ import annotations

import os
import sys

try:
    import tensorflow as tf
except ImportError as exc:  # pragma: no cover - exercised by hand on a machine without TF
    sys.stderr.write(
        "ddpm_tf needs TensorFlow, which is not importable here "
        f"({exc}).\nInstall one flavour: `pip install -e .[gpu]` (tensorflow, NVIDIA GPU) or "
        "`pip install -e .[cpu]` (tensorflow-cpu), or run `bash scripts/setup.sh`.\n"
    )
    raise SystemExit(1) from exc

# On TF >= 2.16 `tf.keras` is Keras 3 (the `keras` package); on TF 2.10 it is Keras 2.
keras = tf.keras
KERAS_VERSION: str = keras.__version__ if hasattr(keras, "__version__") else tf.__version__


def keras_major(version: str) -> int:
    """The major version of a Keras version string ('2.10.0' -> 2): what decides optimizer-state formats."""
    return int(version.split(".", 1)[0])


KERAS3: bool = keras_major(KERAS_VERSION) >= 3
TF_VERSION: str = tf.__version__

# TF 2.10 ships oneDNN 2.6.3, whose AMX bfloat16 weight-gradient convolution
# (jit_avx512_core_amx_convolution_bwd_weights_t) spins in a barrier that needs all its threads running at once,
# which TensorFlow's thread pool does not promise: its jobs queue on the shared intra-op threads, so with two such
# convolutions running at once (inter-op parallelism) each thread can take half of a different one and both spin
# forever (issue 11; oneDNN 2.7 guards that barrier: upstream commit 6a4a232f, "fix possible hang with unsyncable
# runtime"). Capping oneDNN below AMX selects the AVX-512 BF16 kernel, which needs no barrier there. oneDNN reads the
# cap once, at the process's first primitive (a float32 one freezes it too), so it is set here, before any op has
# run. A no-op on CPUs without AMX and for float32 and float16 (oneDNN 2.6 has AMX kernels only for bfloat16 and
# int8). A cap the user set is kept.
ONEDNN_ISA_CAP: str | None = "AVX512_CORE_BF16" if tuple(map(int, TF_VERSION.split(".")[:2])) < (2, 11) else None
if ONEDNN_ISA_CAP and not (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")):
    os.environ["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA_CAP


def variable_key(variable) -> str:
    """A name for a weight that is the same on Keras 2 and 3: 'layer_name/weight_name'."""
    if KERAS3:
        return variable.path
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def handle(variable):
    """The resource handle of a weight (a Keras 3 variable or a tf.Variable), for TensorFlow's fused raw update ops."""
    return variable.value.handle if KERAS3 and isinstance(variable, keras.Variable) else variable.handle


if KERAS3:
    class _FusedAdam(keras.optimizers.Adam):
        """Keras 3's Adam with its per-weight update done by TensorFlow's fused ResourceApplyAdam kernel.

        Keras 3 writes the update as about 20 small ops per weight (Keras 2's Adam already uses the fused
        kernel); with a few hundred weights those ops cost more than some convolutions. Same maths:
        lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); m, v moving averages; w -= lr_t * m / (sqrt(v) + eps).
        """

        def update_step(self, gradient, variable, learning_rate):
            # The TF backend passes the tf.Variable inside each Keras variable: compare dtypes, not strings.
            if self.amsgrad or tf.as_dtype(variable.dtype) != tf.float32:
                return super().update_step(gradient, variable, learning_rate)
            index = self._get_variable_index(variable)
            step = tf.cast(self.iterations + 1, tf.float32)
            tf.raw_ops.ResourceApplyAdam(
                var=handle(variable), m=handle(self._momentums[index]), v=handle(self._velocities[index]),
                beta1_power=tf.pow(tf.constant(self.beta_1, tf.float32), step),
                beta2_power=tf.pow(tf.constant(self.beta_2, tf.float32), step),
                lr=tf.cast(learning_rate, tf.float32), beta1=tf.constant(self.beta_1, tf.float32),
                beta2=tf.constant(self.beta_2, tf.float32), epsilon=tf.constant(self.epsilon, tf.float32),
                grad=tf.cast(gradient, tf.float32))
            return None


def adam(learning_rate):
    """Adam with a fused per-weight update on both lines."""
    if KERAS3:
        return _FusedAdam(learning_rate=learning_rate, name="adam")  # name: the class name is no valid scope
    return keras.optimizers.Adam(learning_rate=learning_rate)


def build_optimizer(optimizer, variables) -> None:
    """Create the optimizer's slot variables now, so a checkpoint restores into them."""
    if KERAS3:
        optimizer.build(variables)
    else:
        optimizer._create_all_weights(variables)


def current_learning_rate(optimizer):
    """The learning rate the optimizer applies at its current step (after any schedule), as a tensor."""
    if KERAS3:
        return tf.convert_to_tensor(optimizer.learning_rate)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._decayed_lr(tf.float32)


def loss_scale_optimizer(optimizer):
    """Wrap an optimizer with dynamic loss scaling (for mixed_float16)."""
    return keras.mixed_precision.LossScaleOptimizer(optimizer)


def current_loss_scale(optimizer):
    """The factor the gradients of loss_scaled_gradients carry: Keras 3's current loss scale (a tensor, graph-safe),
    1.0 on Keras 2 (unscaled there) and without loss scaling."""
    if KERAS3 and isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        return optimizer.scale_loss(tf.constant(1.0))  # the scale, also before the optimizer is built
    return 1.0


def loss_scaled_gradients(optimizer, loss_fn, variables):
    """(loss, gradients, scale) for `optimizer.apply_gradients`: the gradients of `loss_fn()` under the
    optimizer's dynamic loss scaling, and the factor they still carry.

    Keras 2 unscales them here (scale 1.0); Keras 3's LossScaleOptimizer unscales inside
    `apply_gradients`, so its gradients still carry the current scale. Without loss scaling: 1.0.
    """
    scaling = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        loss = loss_fn()
        if not scaling:
            scaled = loss
        elif KERAS3:
            scaled = optimizer.scale_loss(loss)
        else:
            scaled = optimizer.get_scaled_loss(loss)
    grads = tape.gradient(scaled, variables)
    if scaling and not KERAS3:
        grads = optimizer.get_unscaled_gradients(grads)
    return loss, grads, current_loss_scale(optimizer)


def apply_summed_gradients(optimizer, grads, variables, replicas: int) -> None:
    """Apply gradients that are already the sum over all replicas (the same on each), with no second sum.

    Keras 2 takes them as they are (experimental_aggregate_gradients=False); Keras 3's TensorFlow optimizer always
    sums over the replicas inside apply_gradients, so each replica hands it 1/replicas of the sum."""
    if replicas == 1:
        optimizer.apply_gradients(zip(grads, variables))
    elif KERAS3:
        optimizer.apply_gradients(zip([g / replicas for g in grads], variables))
    else:
        optimizer.apply_gradients(zip(grads, variables), experimental_aggregate_gradients=False)


def step_outputs(outputs: dict) -> dict:
    """train_step's scalars in a shape Keras can reduce over replicas: Keras 3 reduces a multi-worker run's outputs
    with strategy.reduce(MEAN, axis=0), which fails on a scalar; shape (1,) there gives back a scalar."""
    if KERAS3 and isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in outputs.items()}
    return outputs


def loss_scale(optimizer) -> float:
    """The current dynamic loss scale (1.0 without loss scaling)."""
    if not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        return 1.0
    return float((optimizer.scale_loss(tf.constant(1.0)) if KERAS3 else optimizer.loss_scale).numpy())


def compile_kwargs(jit_compile: bool) -> dict:
    """Arguments for `Model.compile` that mean the same on both lines."""
    # Keras 3 turns XLA on by default in fit(); Keras 2.10 does not. Always say what we want.
    kwargs = {"jit_compile": bool(jit_compile)}
    if KERAS3:
        kwargs["auto_scale_loss"] = False  # loss scaling is ours (diffusion.make_optimizer), on both lines
    return kwargs
