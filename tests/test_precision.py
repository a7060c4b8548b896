"""Precision policies and XLA: every precision learns, float16 survives an overflow, XLA agrees with graphs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import MODEL, fixed_loss, smooth_images

from ddpm_tf import compat, precision
from ddpm_tf.compat import keras, tf
from ddpm_tf.config import DiffusionConfig, TrainConfig
from ddpm_tf.diffusion import DiffusionModel, make_optimizer
from ddpm_tf.precision import PRECISIONS, apply_policy
from ddpm_tf.schedule import Schedule
from ddpm_tf.unet import build_unet


@pytest.fixture(autouse=True)
def restore_float32():
    yield
    apply_policy("float32")


def build(precision, jit=False, seed=0, lr=1e-3):
    apply_policy(precision)
    keras.utils.set_random_seed(seed)
    net, ema = build_unet(MODEL, 16, 1, name="unet"), build_unet(MODEL, 16, 1, name="ema_unet")
    train_cfg = TrainConfig(precision=precision, learning_rate=lr, seed=seed)
    model = DiffusionModel(net, ema, Schedule.from_config(DiffusionConfig(timesteps=100)), train_cfg)
    model.compile(optimizer=make_optimizer(train_cfg), **compat.compile_kwargs(jit))
    return model


# A fresh process: oneDNN fixes its ISA at the first primitive, so only a new process shows what compat sets.
FIRST_BF16_STEPS = """
import os, sys
sys.path.insert(0, sys.argv[1])
from test_precision import build
from test_train import smooth_images
from ddpm_tf.compat import tf
model = build("mixed_bfloat16")
model.fit(tf.data.Dataset.from_tensors(smooth_images()).repeat(3), epochs=1, verbose=0, shuffle=False)
print("isa cap:", os.environ.get("ONEDNN_MAX_CPU_ISA"))
"""


def test_first_bfloat16_steps_finish_off_the_amx_barrier():
    # Issue 11: on TF 2.10 (oneDNN 2.6.3) an AMX CPU hung forever in the first mixed_bfloat16 step, in the AMX
    # weight-gradient convolution's barrier. The child's timeout only guards against that hang (no timing is asserted).
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env["ONEDNN_VERBOSE"] = "1"  # one line per primitive run, with its kernel's name
    # TF 2.10 turns oneDNN on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX (none: no oneDNN, no hang);
    # on, as it is on the CPUs that hung, unless the caller turned it off.
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    done = subprocess.run([sys.executable, "-c", FIRST_BF16_STEPS, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = [line for line in done.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    if env["TF_ENABLE_ONEDNN_OPTS"] == "0":
        assert not kernels
        return
    assert kernels  # the bfloat16 steps did run through oneDNN
    if compat.ONEDNN_ISA_CAP:  # TF 2.10: capped below AMX, so the hanging kernel cannot be chosen
        assert f"isa cap: {compat.ONEDNN_ISA_CAP}" in done.stdout
        assert not [line for line in kernels if "amx" in line]
    else:  # the newest line: oneDNN >= 2.7 needs no cap, AMX stays available
        assert "isa cap: None" in done.stdout


@pytest.mark.parametrize("flags, onednn_opts, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "1", None),  # a CPU with AVX-512: bfloat16 kernels exist
    ({"avx2", "fma"}, "1", "TensorFlow 2.10's oneDNN has no bfloat16 kernels"),  # the CI failure's CPU
    ({"avx2", "fma"}, "0", "runs mixed_bfloat16's convolutions in float32"),
])
def test_bfloat16_on_a_cpu_without_avx512_trains_in_float32_and_says_so(monkeypatch, flags, onednn_opts, expected):
    # On TF 2.10 with oneDNN on, an AVX2-only CPU failed the first step with "Value for attr 'T' of bfloat16 is
    # not in the list of allowed values" (_FusedConv2D): the bfloat16 pass must stay off there, and say why.
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn_opts)
    note = precision.cpu_bfloat16_note("mixed_bfloat16")
    assert precision.cpu_bfloat16_note("float32") is None
    if expected is None:
        assert note is None
    elif compat.ONEDNN_ISA_CAP or onednn_opts == "0":  # TF 2.10, or oneDNN off
        assert expected in note and "AVX-512" in note
    else:
        assert "runs mixed_bfloat16's convolutions in float32" in note
    apply_policy("mixed_bfloat16")
    assert tf.config.optimizer.get_experimental_options().get("auto_mixed_precision_onednn_bfloat16", False) \
        == (note is None)
    assert keras.mixed_precision.global_policy().name == "float32"  # the graph is float32 on a CPU either way


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_learns(precision):
    model = build(precision)
    x0 = smooth_images()
    before = fixed_loss(model, x0)
    history = model.fit(tf.data.Dataset.from_tensors(x0).repeat(40), epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    assert fixed_loss(model, x0) < 0.7 * before
    assert model.net.weights[0].dtype == "float32" or model.net.weights[0].dtype == tf.float32  # master weights


def test_float16_loss_scaling_skips_an_overflow_and_recovers():
    model = build("mixed_float16")
    step = tf.function(model.train_step)
    x0 = tf.constant(smooth_images())
    step(x0)  # builds the optimizer
    scale = compat.loss_scale(model.optimizer)
    weights = [w.numpy() for w in model.net.trainable_weights]
    step(x0 * 1e6)  # activations overflow float16: non-finite gradients
    assert compat.loss_scale(model.optimizer) < scale  # the scaler lowered the scale...
    for before, w in zip(weights, model.net.trainable_weights):
        assert np.array_equal(before, w.numpy())  # ...and skipped the update
    out = step(x0)
    assert np.isfinite(float(out["step_loss"]))
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(weights, model.net.trainable_weights))


def test_xla_and_graph_steps_agree():
    # The same weights and the same (x_t, t, eps): the loss and its gradients with and without XLA.
    model = build("float32", seed=4)
    x0 = tf.constant(smooth_images())
    t = tf.constant(np.linspace(3, 97, len(x0)).astype(np.int32))
    eps = tf.random.stateless_normal(x0.shape, seed=[1, 2])

    def loss_and_grads():
        with tf.GradientTape() as tape:
            pred = model.net([model.schedule.q_sample(x0, t, eps), t], training=True)
            loss = tf.reduce_mean(tf.square(pred - eps))
        return loss, tape.gradient(loss, model.net.trainable_variables)

    loss_a, grads_a = tf.function(loss_and_grads, jit_compile=False)()
    loss_b, grads_b = tf.function(loss_and_grads, jit_compile=True)()
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-4)
    for a, b in zip(grads_a, grads_b):
        assert np.allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)
