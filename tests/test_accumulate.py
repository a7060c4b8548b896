"""Gradient accumulation (train.accumulate): N micro-batches make the same update as one batch N times as large,
clipping on the summed gradient, loss scaling under mixed_float16, EMA and optimizer stepped once per batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddpm_tf.compat import tf, variable_key
from ddpm_tf.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

MODEL = ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    dropout=0.0, norm_groups=4)


@pytest.fixture(autouse=True)
def float32_policy_after():
    yield
    from ddpm_tf.precision import apply_policy

    apply_policy("float32")


def build(batch_size, accumulate, precision="float32", grad_clip=1.0):
    from ddpm_tf.diffusion import build_diffusion_model

    cfg = Config(data=DataConfig(image_size=16, channels=1), model=MODEL,
                 diffusion=DiffusionConfig(timesteps=100),
                 train=TrainConfig(batch_size=batch_size, accumulate=accumulate, precision=precision, seed=3,
                                   grad_clip=grad_clip, learning_rate=1e-3, jit_compile="false"))
    return build_diffusion_model(cfg, seed=3)[0]


def batches(sizes):
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (n, 16, 16, 1)).astype(np.float32) for n in sizes]


def train_on(model, data):
    ds = tf.data.Dataset.from_generator(lambda: iter(data), output_signature=tf.TensorSpec([None, 16, 16, 1]))
    return model.fit(ds, epochs=1, steps_per_epoch=len(data), verbose=0, shuffle=False)


def weights(net):
    return {variable_key(v): v.numpy() for v in net.weights}


def test_four_micro_batches_equal_one_batch_four_times_as_large():
    data = batches([8, 8, 7])  # the last batch of an epoch is smaller: micro-batches of 2, 2, 2 and 1
    # A clip of 0.02 acts at every step: clipping each micro-batch instead of the sum would differ.
    whole, accumulated = build(8, 1, grad_clip=0.02), build(2, 4, grad_clip=0.02)
    assert accumulated.accumulate == 4 and accumulated.micro_batch == 2
    h_whole, h_acc = train_on(whole, data), train_on(accumulated, data)
    for model in (whole, accumulated):
        assert int(model.optimizer.iterations.numpy()) == 3 and int(model.ema_updates.numpy()) == 3
    np.testing.assert_allclose(h_acc.history["loss"], h_whole.history["loss"], rtol=1e-5)
    for net in ("net", "ema_net"):
        a, b = weights(getattr(whole, net)), weights(getattr(accumulated, net))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-6, err_msg=k)
    assert np.array_equal(whole.rng.state.numpy(), accumulated.rng.state.numpy())  # the same draws


def test_accumulation_under_mixed_float16_loss_scaling():
    """Under dynamic loss scaling the micro-batches' gradients carry the same scale and sum to the whole batch's
    (float16 activations round a little differently in smaller batches)."""
    from ddpm_tf import compat

    model = build(2, 3, "mixed_float16")
    x0 = tf.constant(batches([6])[0])
    t = tf.constant([3, 17, 40, 55, 71, 96])
    eps = tf.random.stateless_normal(x0.shape, seed=[1, 2])
    variables = model.net.trainable_variables
    loss, whole, scale = compat.loss_scaled_gradients(
        model.optimizer, lambda: model.diffusion_loss(x0, t=t, eps=eps), variables)
    acc_loss, acc = model.accumulated_gradients(variables, x0, None, None, t, eps, total=6)
    assert float(compat.current_loss_scale(model.optimizer)) == float(scale)
    assert float(acc_loss) == pytest.approx(float(loss), rel=1e-3)
    flat_whole = np.concatenate([np.ravel(g) for g in whole])
    flat_acc = np.concatenate([np.ravel(g) for g in acc])
    assert np.linalg.norm(flat_whole) > 0
    assert np.linalg.norm(flat_acc - flat_whole) < 1e-2 * np.linalg.norm(flat_whole)


def test_a_run_counts_updates_and_prints_the_effective_batch(tiny_project):
    from click.testing import CliRunner

    from ddpm_tf.cli import main
    from ddpm_tf.runs import RunDir

    cfg_path, run_dir = tiny_project  # 6 images
    result = CliRunner().invoke(main, ["train", "--config", str(cfg_path), "--set", "train.batch_size=1",
                                       "--set", "train.accumulate=3", "--set", "train.epochs=2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 steps per epoch at batch 3 (3 accumulated micro-batches of 1)" in result.output
    assert sorted(RunDir(run_dir).export_paths()) == [2, 4]  # the step counter counts updates


def test_accumulate_is_checked():
    from ddpm_tf.config import from_dict
    from ddpm_tf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.accumulate = 0 is out of range"):
        from_dict({"train": {"accumulate": 0}}, "mine.yaml")
    assert dataclasses.replace(TrainConfig(), batch_size=4, accumulate=8).images_per_step == 32
