"""The U-Net: shapes, parameter count of the reference layout, and the custom layers against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import tf
from ddpm_tf.config import ModelConfig
from ddpm_tf.unet import GroupNorm, SelfAttention, Upsample2x, build_unet, forward_flops


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


def test_upsample_is_nearest():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = Upsample2x()(tf.constant(x)).numpy()
    assert np.array_equal(y, x.repeat(2, axis=1).repeat(2, axis=2))


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
