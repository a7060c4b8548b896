"""Labels and classifier-free guidance at the level of the network, the training step and the sampler."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import keras, tf
from ddpm_tf.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tf.diffusion import DiffusionModel
from ddpm_tf.samplers import Sampler, guide, guided_denoiser
from ddpm_tf.schedule import Schedule
from ddpm_tf.unet import build_unet, num_labels_of

MODEL = ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    dropout=0.0, norm_groups=8)


def random_weights(net, seed=0):
    """Every weight drawn at random: the zero-initialised output layers would make every output 0."""
    rng = np.random.default_rng(seed)
    for v in net.weights:
        v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))
    return net


def labelled_net(k=3, seed=0):
    keras.utils.set_random_seed(seed)
    return random_weights(build_unet(MODEL, 16, 1, name="ema_unet", num_labels=k), seed)


def inputs(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(batch, 16, 16, 1)).astype(np.float32))
    t = tf.constant(rng.integers(0, 100, batch).astype(np.int32))
    return x, t


def test_guidance_arithmetic_against_hand_computed_values():
    cond, uncond = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 0.5])
    # uncond + W (cond - uncond), worked out by hand:
    assert np.allclose(guide(cond, uncond, 0.0), [0.5, 1.0, 0.5])
    assert np.allclose(guide(cond, uncond, 1.0), [1.0, -2.0, 0.5])
    assert np.allclose(guide(cond, uncond, 3.0), [2.0, -8.0, 0.5])
    assert np.allclose(guide(cond, uncond, 0.5), [0.75, -0.5, 0.5])


def test_guided_denoiser_w0_is_unconditional_w1_conditional_and_one_batch_equals_two_calls():
    net = labelled_net()
    x, t = inputs()
    labels = tf.constant([[1, 0, 0], [0, 0, 1], [1, 1, 0]], tf.float32)  # a class, another, two tags
    cond = net([x, t, labels]).numpy()
    uncond = net([x, t, tf.zeros_like(labels)]).numpy()
    assert np.abs(cond - uncond).mean() > 1e-3  # the labels change the prediction at all
    assert np.allclose(guided_denoiser(net, 0.0)(x, t, labels).numpy(), uncond, atol=1e-6)
    assert np.allclose(guided_denoiser(net, 1.0)(x, t, labels).numpy(), cond, atol=1e-6)
    batched = guided_denoiser(net, 2.5)(x, t, labels).numpy()
    assert np.allclose(batched, uncond + 2.5 * (cond - uncond), atol=1e-4)


def test_label_embedding_null_classes_and_tags():
    net = labelled_net(k=3)
    layer = net.get_layer("label_emb")
    table, null = layer.embeddings.numpy(), layer.null.numpy()
    rows = tf.constant([[0, 0, 0], [0, 1, 0], [1, 0, 1]], tf.float32)
    out = layer(rows).numpy()
    assert np.allclose(out[0], null) and np.allclose(out[1], table[1]) and np.allclose(out[2], table[0] + table[2])
    assert min(np.abs(table - null).max(axis=1)) > 1e-3  # the null label is no class's embedding


def test_an_unlabelled_network_is_unchanged_and_labels_add_one_embedding_table():
    plain = build_unet(MODEL, 16, 1)
    labelled = build_unet(MODEL, 16, 1, num_labels=5)
    assert num_labels_of(plain) == 0 and num_labels_of(labelled) == 5
    assert [i.name for i in plain.inputs] == ["x_t", "t"]
    temb_dim = MODEL.base_channels * 4
    assert labelled.count_params() - plain.count_params() == (5 + 1) * temb_dim  # K embeddings + the null one
    assert not any("label" in w.name for w in plain.weights)


def make_model(k, label_dropout=0.1, seed=0, timesteps=100):
    keras.utils.set_random_seed(seed)
    net = build_unet(MODEL, 16, 1, name="unet", num_labels=k)
    ema = build_unet(MODEL, 16, 1, name="ema_unet", num_labels=k)
    train_cfg = TrainConfig(ema_decay=0.99, seed=seed, learning_rate=2e-3, label_dropout=label_dropout)
    model = DiffusionModel(net, ema, Schedule.from_config(DiffusionConfig(timesteps=timesteps)), train_cfg, "eps")
    model.compile(optimizer=keras.optimizers.Adam(2e-3), jit_compile=False)
    return model


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_label_dropout_happens_at_the_configured_rate_and_only_as_the_null_label(rate):
    model = make_model(4, label_dropout=rate)
    n = 20000
    labels = tf.one_hot(np.arange(n) % 4, 4)
    dropped = model.drop_labels(labels, tf.random.stateless_uniform([n], [7, 8])).numpy()
    null_rows = dropped.max(axis=1) == 0
    kept = ~null_rows
    assert np.array_equal(dropped[kept], labels.numpy()[kept])  # a kept row is its own class, never another
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(null_rows.mean() - rate) <= 4 * sigma + 1e-9


def stripes(n, horizontal: bool, seed: int):
    """(n, 16, 16, 1) stripes in [-1, 1], random phase and 2-3 periods, rows varying (horizontal) or columns."""
    rng = np.random.default_rng(seed)
    pos = np.arange(16)[:, None] / 16.0
    out = []
    for _ in range(n):
        wave = np.sin(2 * np.pi * (rng.uniform(2, 3) * pos + rng.uniform()))  # (16, 1): varies along rows
        img = np.broadcast_to(wave, (16, 16)) if horizontal else np.broadcast_to(wave.T, (16, 16))
        out.append(img)
    return np.stack(out)[..., None].astype(np.float32)


def orientation(images):
    """Per image: +1 for horizontal stripes (change from row to row), -1 for vertical ones."""
    x = images.astype(np.float64)[..., 0]
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2))
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))
    return (dy - dx) / (dy + dx + 1e-9)


def test_a_two_class_model_draws_the_class_asked_for_and_guidance_separates_more():
    x0 = np.concatenate([stripes(32, True, 0), stripes(32, False, 1)])
    labels = np.repeat(np.eye(2, dtype=np.float32), 32, axis=0)
    assert orientation(x0[:32]).min() > 0.9 and orientation(x0[32:]).max() < -0.9
    model = make_model(2, label_dropout=0.2, timesteps=100)
    ds = tf.data.Dataset.from_tensor_slices((x0, labels)).shuffle(64, seed=0).repeat().batch(16)
    model.fit(ds, steps_per_epoch=400, epochs=1, verbose=0)
    seeds = np.arange(16)
    separation = {}
    for w in (0.0, 1.0, 3.0):
        smp = Sampler(model.ema_net, model.schedule, "ddim", 25, guidance=w)
        horizontal = orientation(smp(seeds, (16, 16, 1), labels=np.tile([1.0, 0.0], (16, 1))))
        vertical = orientation(smp(seeds, (16, 16, 1), labels=np.tile([0.0, 1.0], (16, 1))))
        separation[w] = float(np.mean(horizontal) - np.mean(vertical))
        if w > 0:
            assert np.mean(horizontal > 0) >= 0.8 and np.mean(vertical < 0) >= 0.8, (w, horizontal, vertical)
    assert separation[0.0] == pytest.approx(0.0, abs=1e-6)  # W = 0: both rows are the same unconditional images
    assert separation[3.0] > separation[1.0] > 0.1, separation


def test_an_image_depends_on_its_seed_and_label_only_not_on_its_batch():
    net = labelled_net(k=2)
    smp = Sampler(net, Schedule.from_config(DiffusionConfig(timesteps=100)), "ddim", 5, guidance=2.0)
    rows = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    together = smp([7, 8, 9], (16, 16, 1), labels=rows)
    alone = smp([8], (16, 16, 1), labels=rows[1:2])
    assert np.allclose(together[1], alone[0], atol=1e-4)
    assert smp.metadata()["ddpm_tf:guidance"] == 2.0
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        Sampler(net, smp.schedule, "ddim", 5, guidance=-1.0)
