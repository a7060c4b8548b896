"""The U-Net: shapes, parameter count of the reference layout, and the custom layers against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import keras, tf
from ddpm_tf.config import ModelConfig
from ddpm_tf.precision import apply_policy
from ddpm_tf.unet import GroupNorm, SelfAttention, Upsample2x, build_unet, forward_flops, group_norm


@pytest.mark.parametrize("size, channels, mult, attn, heads, blocks", [
    (16, 3, (1, 2), (8,), 1, 1),
    (16, 1, (1, 2, 2), (16, 4), 2, 2),
    (32, 3, (1, 1, 2, 2), (), 1, 1),
])
def test_output_shape_equals_input_shape(size, channels, mult, attn, heads, blocks):
    cfg = ModelConfig(base_channels=16, channel_mult=mult, num_res_blocks=blocks, attention_resolutions=attn,
                      attention_heads=heads, dropout=0.1, norm_groups=8)
    net = build_unet(cfg, size, channels)
    x = tf.random.normal([2, size, size, channels])
    y = net([x, tf.constant([0, 999])], training=True)
    assert y.shape == x.shape
    assert y.dtype == tf.float32


def test_output_starts_at_zero():
    # The output conv is initialised at zero (DDPM): the first prediction is exactly 0.
    cfg = ModelConfig(base_channels=16, channel_mult=(1, 2), attention_resolutions=(8,), norm_groups=8)
    net = build_unet(cfg, 16, 3)
    y = net([tf.random.normal([2, 16, 16, 3]), tf.constant([5, 6])])
    assert np.all(y.numpy() == 0.0)


def test_reference_layout_parameter_count_and_flops():
    # configs/portrait64.yaml's network: the reference counts 63.2M parameters, ~23 GFLOP per image.
    cfg = ModelConfig(base_channels=64, channel_mult=(1, 2, 4, 8), num_res_blocks=2, attention_resolutions=(16, 8),
                      norm_groups=32)
    net = build_unet(cfg, 64, 3)
    assert net.count_params() == 63_200_387
    assert forward_flops(cfg, 64, 3) / 1e9 == pytest.approx(23.56, abs=0.05)


def test_group_norm_matches_numpy():
    x = np.random.default_rng(0).normal(2.0, 3.0, (2, 5, 6, 8)).astype(np.float32)
    layer = GroupNorm(4, epsilon=1e-5)
    y = layer(tf.constant(x)).numpy()
    g = x.reshape(2, 5, 6, 4, 2)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    expected = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    assert np.allclose(y, expected, atol=1e-4)
    swish = GroupNorm(4, swish=True)(tf.constant(x)).numpy()
    assert np.allclose(swish, expected / (1 + np.exp(-expected)), atol=1e-4)


def _gn_inputs(seed=0, shape=(2, 5, 6, 8)):
    """x with a non-zero mean, a non-trivial affine transform, and an upstream gradient dy."""
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    gamma = rng.normal(1.0, 0.5, shape[-1]).astype(np.float32)
    beta = rng.normal(0.0, 0.5, shape[-1]).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    return x, gamma, beta, dy


def _reference_group_norm(x, gamma, beta, groups, swish):
    """Group norm the plain way (moments, normalise, affine, swish), for autodiff to differentiate."""
    b, h, w, c = x.shape
    g = tf.reshape(x, [b, h, w, groups, c // groups])
    mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
    y = tf.reshape((g - mean) / tf.sqrt(var + 1e-5), x.shape) * gamma + beta
    return y * tf.sigmoid(y) if swish else y


def _value_and_grads(fn, x, gamma, beta, dy):
    """fn(x, gamma, beta) and the gradients of sum(fn * dy) with respect to x, gamma and beta."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = fn(x, gamma, beta)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    return [y, *tape.gradient(loss, [x, gamma, beta])]


def _assert_close(actual, expected, rtol):
    """Equal to rtol relative to each array's largest magnitude."""
    for a, e in zip(actual, expected):
        a, e = np.asarray(tf.cast(a, tf.float32)), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize("swish", [False, True])
def test_group_norm_with_affine_matches_numpy(swish):
    x, gamma, beta, _ = _gn_inputs()
    y = group_norm(tf.constant(x), tf.constant(gamma), tf.constant(beta), 4, swish=swish).numpy()
    g = x.reshape(2, 5, 6, 4, 2).astype(np.float64)
    xhat = ((g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-5))
    expected = xhat.reshape(x.shape) * gamma + beta
    if swish:
        expected = expected / (1 + np.exp(-expected))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swish", [False, True])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_group_norm_gradients_match_autodiff(swish, mode):
    x, gamma, beta, dy = (tf.constant(a) for a in _gn_inputs(1))

    def run(fn):
        step = lambda *a: _value_and_grads(fn, *a)  # noqa: E731
        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "xla")
        return step(x, gamma, beta, dy)

    actual = run(lambda x, g, b: group_norm(x, g, b, 4, swish=swish))
    expected = run(lambda x, g, b: _reference_group_norm(x, g, b, 4, swish))
    _assert_close(actual, expected, rtol=1e-4)


def test_group_norm_layer_gradients_reach_its_weights():
    x, gamma, beta, dy = _gn_inputs(2)
    layer = GroupNorm(4, swish=True)
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(x)) * dy)
    actual = tape.gradient(loss, [layer.gamma, layer.beta])
    expected = _value_and_grads(lambda x, g, b: _reference_group_norm(x, g, b, 4, True), *(
        tf.constant(a) for a in (x, gamma, beta, dy)))[2:]
    _assert_close(actual, expected, rtol=1e-4)


def _cpu_bfloat16_conv_works() -> bool:
    """Whether a bfloat16 tf.nn.conv2d inside a tf.function gives its output on this machine and TensorFlow."""
    x = tf.ones([1, 4, 4, 2], tf.bfloat16)
    try:
        return tf.function(lambda x: tf.nn.conv2d(x, tf.ones([3, 3, 2, 2], tf.bfloat16), 1, "SAME"))(x).shape[0] == 1
    except tf.errors.InternalError:
        return False


def _conv_then_norm_grads(norm, precision, bf16_mode="auto"):
    """Value and gradients of norm(conv(x)) in a tf.function, under `precision`."""
    x, gamma, beta, dy = (tf.constant(a) for a in _gn_inputs(3, (2, 8, 8, 16)))
    kernel = tf.constant(np.random.default_rng(4).normal(0, 0.3, (3, 3, 16, 16)).astype(np.float32))
    try:
        apply_policy(precision, bf16_mode)
        dtype = keras.mixed_precision.global_policy().compute_dtype

        # TF 2.10's own (Eigen) CPU convolution has no bfloat16 output where oneDNN is off (CPUs without AVX-512
        # VNNI/BF16, or TF_ENABLE_ONEDNN_OPTS=0): "Missing 0-th output from Conv2D". There the convolution runs in
        # float32 and its output is cast, so the norm under test still sees bfloat16 activations.
        conv_dtype = dtype if dtype != "bfloat16" or _cpu_bfloat16_conv_works() else "float32"

        @tf.function
        def run(x, gamma, beta):
            conv = lambda x: tf.cast(  # noqa: E731
                tf.nn.conv2d(tf.cast(x, conv_dtype), tf.cast(kernel, conv_dtype), 1, "SAME"), dtype)
            return _value_and_grads(lambda x, g, b: norm(conv(x), g, b), x, gamma, beta, dy)

        return run(x, gamma, beta)
    finally:
        apply_policy("float32")


@pytest.mark.parametrize("bf16_mode", ["keras", "onednn"])
def test_group_norm_gradients_under_mixed_bfloat16(bf16_mode):
    # keras: the norm sees bfloat16 activations; onednn: a float32 graph that grappler's
    # auto-mixed-precision pass rewrites around the convolution in front of the norm.
    actual = _conv_then_norm_grads(lambda x, g, b: group_norm(x, g, b, 4, swish=True), "mixed_bfloat16", bf16_mode)
    expected = _conv_then_norm_grads(lambda x, g, b: _reference_group_norm(x, g, b, 4, True), "float32")
    _assert_close(actual, expected, rtol=2e-2)


def test_upsample_is_nearest():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = Upsample2x()(tf.constant(x)).numpy()
    assert np.array_equal(y, x.repeat(2, axis=1).repeat(2, axis=2))


@pytest.mark.parametrize("jit", [False, True])
def test_upsample_gradient_sums_each_block(jit):
    dy = np.random.default_rng(5).normal(size=(2, 6, 8, 3)).astype(np.float32)
    upsample = Upsample2x()

    @tf.function(jit_compile=jit)
    def grad(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = upsample(x)
        return tape.gradient(y, x, output_gradients=dy)

    dx = grad(tf.zeros([2, 3, 4, 3]), tf.constant(dy)).numpy()
    np.testing.assert_allclose(dx, dy.reshape(2, 3, 2, 4, 2, 3).sum(axis=(2, 4)), rtol=1e-6, atol=1e-6)


def test_self_attention_matches_numpy():
    rng = np.random.default_rng(1)
    heads, c = 2, 8
    qkv = rng.normal(size=(1, 3, 3, 3 * c)).astype(np.float32)
    out = SelfAttention(heads)(tf.constant(qkv)).numpy()
    flat = qkv.reshape(9, 3, heads, c // heads)
    expected = np.zeros((9, heads, c // heads), np.float32)
    for h in range(heads):
        q, k, v = flat[:, 0, h], flat[:, 1, h], flat[:, 2, h]
        s = q @ k.T / np.sqrt(c // heads)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        expected[:, h] = w @ v
    assert np.allclose(out.reshape(9, heads, c // heads), expected, atol=1e-5)
