"""Training: the loss falls on a fixed batch, EMA arithmetic, and the data order of the input pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_tf.compat import keras, tf
from ddpm_tf.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tf.data.pipeline import make_dataset
from ddpm_tf.diffusion import DiffusionModel, ema_decay_at
from ddpm_tf.samplers import Sampler
from ddpm_tf.schedule import Schedule
from ddpm_tf.unet import build_unet

MODEL = ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    dropout=0.0, norm_groups=8)


def make_model(ema_decay=0.999, ema_warmup=True, lr=1e-3, seed=0, prediction="eps", schedule="linear",
               loss_weighting="none"):
    keras.utils.set_random_seed(seed)
    net, ema = build_unet(MODEL, 16, 1, name="unet"), build_unet(MODEL, 16, 1, name="ema_unet")
    train_cfg = TrainConfig(ema_decay=ema_decay, ema_warmup=ema_warmup, seed=seed, learning_rate=lr,
                            loss_weighting=loss_weighting)
    sched = Schedule.from_config(DiffusionConfig(timesteps=100, schedule=schedule))
    model = DiffusionModel(net, ema, sched, train_cfg, prediction)
    model.compile(optimizer=keras.optimizers.Adam(lr), jit_compile=False)
    return model


def smooth_images(n=8, size=16):
    """Smooth, structured images in [-1, 1] (a learnable distribution, unlike noise)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [np.sin(2 * np.pi * (xx * (1 + i % 3) + yy * (i // 3))) for i in range(n)]
    return np.stack(imgs)[..., None].astype(np.float32)


def fixed_loss(model, x0):
    """The model's training loss at fixed timesteps and noise (not the random training draw)."""
    t = tf.constant(np.linspace(5, 95, len(x0)).astype(np.int32))
    eps = tf.random.stateless_normal(x0.shape, seed=[7, 7])
    return float(model.diffusion_loss(tf.constant(x0), training=False, t=t, eps=eps))


def test_loss_falls_on_a_fixed_batch():
    model = make_model()
    x0 = smooth_images()
    before = fixed_loss(model, x0)
    ds = tf.data.Dataset.from_tensors(x0).repeat(60)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    after = fixed_loss(model, x0)
    assert before == pytest.approx(1.0, abs=0.15)  # zero-initialised output predicts eps = 0
    assert after < 0.6 * before
    assert np.isfinite(history.history["loss"]).all()
    assert int(model.optimizer.iterations.numpy()) == 60
    assert int(model.ema_updates.numpy()) == 60


def test_ema_arithmetic_without_warmup():
    model = make_model(ema_decay=0.9, ema_warmup=False)
    w0 = [w.numpy() for w in model.net.weights]
    for w in model.net.weights:
        w.assign(w + 1.0)
    model.update_ema()
    for e, old, w in zip(model.ema_net.weights, w0, model.net.weights):
        assert np.allclose(e.numpy(), 0.9 * old + 0.1 * w.numpy(), atol=1e-6)


def test_ema_warmup_schedule():
    assert float(ema_decay_at(0, 0.999, True)) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert float(ema_decay_at(90, 0.999, True)) == pytest.approx(91 / 100)
    assert float(ema_decay_at(10**6, 0.999, True)) == pytest.approx(0.999)
    assert float(ema_decay_at(0, 0.999, False)) == pytest.approx(0.999)
    model = make_model(ema_decay=0.999, ema_warmup=True)
    e0 = [e.numpy() for e in model.ema_net.weights]
    for w in model.net.weights:
        w.assign(w + 1.0)
    model.update_ema()  # first update uses decay 0.1
    for e, old in zip(model.ema_net.weights, e0):
        assert np.allclose(e.numpy(), old + 0.9, atol=1e-5)


def _epochs(ds, steps):
    return np.concatenate([b.numpy() for b in ds.take(steps)])


def test_every_image_every_epoch_reshuffled():
    images = (np.arange(10)[:, None, None, None] * np.ones((10, 2, 2, 1)) * 20).astype(np.uint8)
    ds = make_dataset(images, batch_size=4, seed=5, flip=False)
    seen = _epochs(ds, 6)  # 2 epochs of ceil(10 / 4) = 3 batches
    assert seen.shape == (20, 2, 2, 1)
    ids = np.round((seen[:, 0, 0, 0] + 1) * 127.5 / 20).astype(int)
    first, second = ids[:10], ids[10:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert list(first) != list(second)  # reshuffled every epoch
    # The order is a function of (seed, epoch): starting at epoch 1 gives the second epoch again.
    resumed = _epochs(make_dataset(images, batch_size=4, seed=5, start_epoch=1, flip=False), 3)
    assert np.array_equal(resumed, seen[10:])


def test_flips_are_random_but_reproducible():
    images = np.zeros((16, 2, 2, 1), np.uint8)
    images[:, :, 0] = 255  # left column white: a flip moves it right
    a = _epochs(make_dataset(images, 16, seed=1), 1)
    b = _epochs(make_dataset(images, 16, seed=1), 1)
    assert np.array_equal(a, b)
    flipped = (a[:, 0, 1, 0] > 0).sum()
    assert 0 < flipped < 16


def test_warmup_schedule_and_current_learning_rate():
    from ddpm_tf import compat
    from ddpm_tf.diffusion import WarmupSchedule, make_optimizer

    schedule = WarmupSchedule(1e-3, 10)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(4)) == pytest.approx(5e-4)
    assert float(schedule(9)) == pytest.approx(1e-3) and float(schedule(1000)) == pytest.approx(1e-3)
    opt = make_optimizer(TrainConfig(learning_rate=1e-3, warmup_steps=10))
    var = tf.Variable([1.0])
    opt.apply_gradients([(tf.constant([1.0]), var)])
    opt.apply_gradients([(tf.constant([1.0]), var)])
    assert float(compat.current_learning_rate(opt)) == pytest.approx(3e-4)  # step 2 -> (2 + 1) / 10


def test_adam_matches_its_closed_form():
    from ddpm_tf import compat

    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-7
    opt = compat.adam(lr)
    var = tf.Variable([0.5, -1.0, 2.0])
    rng = np.random.default_rng(0)
    w, m, v = var.numpy().astype(np.float64), 0.0, 0.0
    for t in range(1, 4):
        g = rng.normal(size=3)
        opt.apply_gradients([(tf.constant(g, tf.float32), var)])
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    assert np.allclose(var.numpy(), w, atol=1e-6)


def test_adam_updates_each_weight_with_one_fused_kernel():
    from ddpm_tf import compat

    opt = compat.adam(1e-2)
    var = tf.Variable([0.5, -1.0, 2.0])
    compat.build_optimizer(opt, [var])

    @tf.function
    def step(g):
        opt.apply_gradients([(g, var)])

    graph = step.get_concrete_function(tf.TensorSpec([3], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    ops |= {node.op for f in graph.as_graph_def().library.function for node in f.node_def}
    assert "ResourceApplyAdam" in ops
    assert "Square" not in ops  # the unfused update squares the gradient


@pytest.mark.parametrize("prediction, schedule, weighting", [
    ("v", "linear", "none"), ("x0", "linear", "min_snr"), ("eps", "cosine", "min_snr"), ("v", "cosine", "min_snr"),
])
def test_every_objective_and_schedule_learns_and_samples(prediction, schedule, weighting):
    model = make_model(prediction=prediction, schedule=schedule, loss_weighting=weighting)
    x0 = smooth_images()
    before = fixed_loss(model, x0)
    model.fit(tf.data.Dataset.from_tensors(x0).repeat(60), epochs=1, verbose=0, shuffle=False)
    after = fixed_loss(model, x0)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
    for name, steps in (("ddpm", None), ("ddim", 10), ("dpmpp_2m", 10)):
        sampler = Sampler(model.net, model.schedule, name, steps, prediction=prediction)
        images = sampler(np.arange(2), (16, 16, 1))
        assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()
        assert np.abs(images).max() <= 1.0 + 1e-5  # the last step returns the clipped x0
