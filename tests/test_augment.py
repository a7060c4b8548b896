"""Non-leaky augmentation (data/augment.py): each transform against its closed form on a small image, zero
parameters as the identity, the conditioning vector's layout, the draw as a function of (seed, epoch), the
pipeline's batches, and a network that is given the vector in training and zeros in sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm_tf.compat import tf
from ddpm_tf.data import augment

S = 8
C = (S - 1) / 2


def params(**values):
    """(1, 7) parameters with the named ones set (PARAMETERS' names), the others zero."""
    unknown = set(values) - set(augment.PARAMETERS)
    assert not unknown, unknown
    return tf.constant([[float(values.get(name, 0.0)) for name in augment.PARAMETERS]], tf.float32)


def image(seed=0, size=S, channels=2):
    return np.random.default_rng(seed).uniform(-1, 1, (1, size, size, channels)).astype(np.float32)


def ramp(size=S):
    """f(x, y) = 0.1 x + 0.03 y - 0.4 at pixel centres (x the column): bilinear resampling is exact on it."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (0.1 * x + 0.03 * y - 0.4)[None, :, :, None], lambda xs, ys: 0.1 * xs + 0.03 * ys - 0.4


def out(x, **values):
    return augment.apply(tf.constant(x), params(**values)).numpy()


def test_zero_parameters_are_the_identity_bit_for_bit():
    x = image()
    assert np.array_equal(out(x), x)
    batch = np.concatenate([image(1), image(2)])
    p = tf.concat([params(), params(theta=0.3)], 0)
    y = augment.apply(tf.constant(batch), p).numpy()
    assert np.array_equal(y[0], batch[0]) and not np.allclose(y[1], batch[1])


def test_xflip_mirrors_the_columns():
    x = image()
    np.testing.assert_allclose(out(x, flip=1), x[:, :, ::-1], atol=1e-6)


def test_integer_translation_shifts_with_mirrored_edges():
    x = image()
    # Content moves tx to the right and ty down; the uncovered edge is the image mirrored about its border
    # (TensorFlow's REFLECT: ... c b a | a b c ...), numpy's "symmetric" padding.
    tx, ty = 2, -3
    padded = np.pad(x[0], ((4, 4), (4, 4), (0, 0)), mode="symmetric")
    expected = padded[4 - ty:4 - ty + S, 4 - tx:4 - tx + S]
    np.testing.assert_allclose(out(x, tx=tx, ty=ty)[0], expected, atol=1e-6)


@pytest.mark.parametrize("theta, k", [(math.pi / 2, -1), (math.pi, 2), (-math.pi / 2, 1)])
def test_rotation_by_right_angles_is_rot90(theta, k):
    x = image()
    np.testing.assert_allclose(out(x, theta=theta)[0], np.rot90(x[0], k, axes=(0, 1)), atol=1e-5)


def inside(xs, ys):
    return (xs >= 0) & (xs <= S - 1) & (ys >= 0) & (ys <= S - 1)


def test_isotropic_scaling_on_a_ramp():
    x, f = ramp()
    w = 5.0  # s = 2**(0.2 * 5) = 2: a 2x zoom about the centre
    s = 2.0 ** (augment.SCALE_STD * w)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    src_x, src_y = C + (xx - C) / s, C + (yy - C) / s
    assert inside(src_x, src_y).all()
    np.testing.assert_allclose(out(x, scale_w=w)[0, :, :, 0], f(src_x, src_y), atol=1e-5)


@pytest.mark.parametrize("r", [0.0, math.pi / 2])
def test_anisotropic_scaling_on_a_ramp(r):
    x, f = ramp()
    w = -2.5  # a = 2**(0.2 * -2.5) = 1/sqrt(2) along the axis at angle r, sqrt(2) across it
    a = 2.0 ** (augment.ANISO_STD * w)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    along, across = (xx - C, yy - C) if r == 0.0 else (yy - C, -(xx - C))
    along, across = along / a, across * a  # the inverse map
    src_x, src_y = (C + along, C + across) if r == 0.0 else (C - across, C + along)
    got = out(x, aniso_w=w, aniso_r=r)[0, :, :, 0]
    ok = inside(src_x, src_y)
    assert ok.sum() >= 24
    np.testing.assert_allclose(got[ok], f(src_x, src_y)[ok], atol=1e-5)


def test_composition_is_geometric_after_translation_after_flip():
    """The resampling matrix is the inverse of geometric . translate . flip, built here independently in 3x3
    homogeneous pixel coordinates."""
    flip, tx, ty, scale_w, theta, aniso_w, aniso_r = 1.0, 1.0, -2.0, 0.7, 0.4, -0.9, 1.1
    p = params(flip=flip, tx=tx, ty=ty, scale_w=scale_w, theta=theta, aniso_w=aniso_w, aniso_r=aniso_r)

    def rot(a):
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])

    centre = np.array([[1, 0, C], [0, 1, C], [0, 0, 1]])
    s, a = 2 ** (0.2 * scale_w), 2 ** (0.2 * aniso_w)
    geo = np.diag([s, s, 1]) @ rot(theta) @ rot(aniso_r) @ np.diag([a, 1 / a, 1]) @ rot(-aniso_r)
    forward = (centre @ geo @ np.linalg.inv(centre) @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
               @ np.array([[-1, 0, 2 * C], [0, 1, 0], [0, 0, 1]]))
    np.testing.assert_allclose(augment.inverse_matrices(p, S).numpy()[0], np.linalg.inv(forward)[:2], atol=1e-5)


def test_conditioning_vector_layout():
    assert augment.DIM == len(augment.LAYOUT) == 8
    size = 32  # the largest shift is 4 pixels
    v = augment.conditioning(params(flip=1, tx=-2, ty=4, scale_w=0.5, theta=0.3, aniso_w=-1.2, aniso_r=0.7), size)
    expected = [1.0, -0.5, 1.0, 0.5, math.cos(0.3) - 1, math.sin(0.3), -1.2 * math.cos(0.7), -1.2 * math.sin(0.7)]
    np.testing.assert_allclose(v.numpy()[0], expected, atol=1e-6)
    assert np.array_equal(augment.conditioning(params(), size).numpy(), np.zeros((1, 8), np.float32))


def test_draw_is_a_function_of_seed_and_epoch_with_probability_p():
    n, p, size = 20000, 0.3, 32
    a = augment.draw(n, p, size, seed=4, epoch=2).numpy()
    assert np.array_equal(a, augment.draw(n, p, size, seed=4, epoch=2).numpy())
    assert not np.array_equal(a, augment.draw(n, p, size, seed=4, epoch=3).numpy())
    assert not np.array_equal(a, augment.draw(n, p, size, seed=5, epoch=2).numpy())
    flip, tx, ty, scale_w, theta, aniso_w, aniso_r = a.T
    # Each transform selected with probability p (binomial std of the share ~0.003): x-flip then half of those.
    assert abs((flip == 1).mean() - p / 2) < 0.015
    for selected in (scale_w != 0, theta != 0, aniso_w != 0):
        assert abs(selected.mean() - p) < 0.015
    assert abs(((aniso_r != 0).mean()) - p * augment.ANISO_ROTATE_PROB) < 0.015
    assert set(np.unique(tx)) == set(range(-4, 5)) and np.array_equal(ty, np.round(ty))
    assert abs(theta[theta != 0]).max() <= math.pi and abs(scale_w[scale_w != 0].std() - 1) < 0.05
    assert not augment.draw(100, 0.0, size, seed=4, epoch=2).numpy().any()


def test_pipeline_batches_carry_the_vector_and_keep_the_order():
    from ddpm_tf.data.pipeline import make_dataset

    images = np.random.default_rng(0).integers(0, 256, (12, S, S, 1), dtype=np.uint8)
    plain = list(make_dataset(images, 4, seed=7).take(6))
    augmented = list(make_dataset(images, 4, seed=7, augment_p=0.2).take(6))
    transformed = 0
    for x_plain, (x, y, a) in zip(plain, augmented):
        assert y.shape == (4, 0) and a.shape == (4, augment.DIM)
        same = ~np.any(a.numpy() != 0, axis=1)  # untouched images equal the plain pipeline's, bit for bit
        assert np.array_equal(x.numpy()[same], x_plain.numpy()[same])
        assert not np.allclose(x.numpy()[~same], x_plain.numpy()[~same])
        transformed += int((~same).sum())
    assert 8 <= transformed <= 22  # about 1 - 0.8**5 of 24 expected, 16 (some draws are no-ops: a zero shift)
    again = list(make_dataset(images, 4, seed=7, augment_p=0.2, start_epoch=1, skip_images=4).take(2))
    for (x, _, a), (x_ref, _, a_ref) in zip(again, augmented[4:]):  # epoch 1 from its second batch: a resume
        assert np.array_equal(x.numpy(), x_ref.numpy()) and np.array_equal(a.numpy(), a_ref.numpy())


def tiny_model_cfg():
    from ddpm_tf.config import ModelConfig

    return ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                       norm_groups=4)


@pytest.mark.parametrize("num_labels", [0, 3])
def test_sampling_passes_zeros_and_the_network_starts_as_the_plain_one(num_labels):
    from ddpm_tf.compat import keras, variable_key
    from ddpm_tf.samplers import guided_denoiser
    from ddpm_tf.unet import augment_dim_of, build_unet, network_inputs, num_labels_of

    keras.utils.set_random_seed(3)
    plain = build_unet(tiny_model_cfg(), S, 1, num_labels=num_labels)
    keras.utils.set_random_seed(3)
    net = build_unet(tiny_model_cfg(), S, 1, num_labels=num_labels, augment_dim=augment.DIM)
    assert augment_dim_of(net) == augment.DIM and num_labels_of(net) == num_labels and augment_dim_of(plain) == 0
    assert net.count_params() == plain.count_params() + augment.DIM * 8 * 4  # one bias-free (DIM, temb) map
    plain_weights = {variable_key(v): v.numpy() for v in plain.weights}
    for v in net.weights:  # the same seed: every other weight equal, the new map zero
        want = plain_weights.get(variable_key(v), np.zeros(v.shape))
        assert np.array_equal(v.numpy(), want), variable_key(v)
    rng = np.random.default_rng(1)
    for v in net.weights:  # as if trained (the output convolutions start at zero): the vector now matters
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32) + (v.numpy() if "norm" in variable_key(v) else 0))
    x = tf.random.normal([2, S, S, 1], seed=2)
    t = tf.constant([10, 500])
    labels = tf.constant(np.eye(3, dtype=np.float32)[:2]) if num_labels else None
    vector = augment.conditioning(tf.concat([params(theta=1.0), params(flip=1)], 0), S)
    zeros = net(network_inputs(net, x, t, labels, tf.zeros([2, augment.DIM]))).numpy()
    assert not np.allclose(net(network_inputs(net, x, t, labels, vector)).numpy(), zeros, atol=1e-4)
    for guidance in (0.0, 1.0, 2.0):
        denoise = guided_denoiser(net, guidance)
        got = denoise(x, t, labels if num_labels else tf.zeros([2, 0])).numpy()
        if guidance == 1.0 or not num_labels:
            np.testing.assert_allclose(got, zeros, atol=1e-5)
    assert len(network_inputs(net, x, t)) == 3 + bool(num_labels)


def test_bench_measures_the_augmented_pipeline(tmp_path):
    """`ddpm bench --set train.augment_p=P` times training's own input pipeline with the augmentation on."""
    import json

    from click.testing import CliRunner
    from conftest import write_config

    from ddpm_tf.cli import main

    cfg = write_config(tmp_path / "b.yaml", {"run": {"dir": str(tmp_path / "runs" / "b")},
                                             "data": {"dir": str(tmp_path / "none"), "image_size": 16}})
    results = {}
    for p in ("0", "0.15"):
        out = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--set", f"train.augment_p={p}", "--json-only",
                                        "--steps", "2", "--sample-steps", "1", "--sample-n", "2"],
                                 catch_exceptions=False)
        assert out.exit_code == 0, out.output
        results[p] = json.loads(out.output.strip().splitlines()[-1])
    assert results["0.15"]["augment_p"] == 0.15 and results["0"]["augment_p"] == 0
    temb = 16 * 4  # conftest's base_channels x 4
    assert results["0.15"]["params"] - results["0"]["params"] == augment.DIM * temb
    assert all(math.isfinite(r["train_img_per_s"]) and r["train_img_per_s"] > 0 for r in results.values())
    bad = CliRunner().invoke(main, ["bench", "--config", str(cfg), "--set", "train.augment_p=2"])
    assert bad.exit_code == 2 and "train.augment_p" in bad.output and "Traceback" not in bad.output
