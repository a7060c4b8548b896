"""model.recompute (gradient checkpointing): the same network, output and gradients, with the blocks run again.

Tiny networks (16x16 images, base width 16) in float32: recomputation repeats the same ops on the same values,
so outputs and gradients agree to float32 rounding (1e-5 of each array's largest magnitude; measured: below
1.2e-6). Timeouts: pyproject's, as every test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ddpm_tf.compat import keras, tf, variable_key
from ddpm_tf.config import ModelConfig
from ddpm_tf.runs import load_weights, save_weights
from ddpm_tf.unet import build_unet, residual_block

RTOL = 1e-5
TINY = ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                   dropout=0.0, norm_groups=8)


def _pair(cfg=TINY, size=16, channels=3, **inputs):
    """(plain, recomputing) networks of `cfg` with the same weights, none of them zero (the output conv starts
    at zero, which would make most gradients zero too)."""
    nets = []
    for recompute in (False, True):
        keras.utils.set_random_seed(0)
        nets.append(build_unet(dataclasses.replace(cfg, recompute=recompute), size, channels, **inputs))
    rng = np.random.default_rng(1)
    for v in nets[0].weights:
        v.assign(rng.normal(1.0 if "gamma" in v.name else 0.0, 0.2, v.shape).astype(np.float32))
    nets[1].set_weights(nets[0].get_weights())
    return nets


def _output_and_gradients(net, mode: str, size=16):
    """The training-mode output on a fixed batch and the gradients of a loss with respect to every weight."""
    x = tf.random.stateless_normal([2, size, size, 3], [1, 2])
    t = tf.constant([3, 40])

    def step():
        with tf.GradientTape() as tape:
            y = net([x, t], training=True)
            loss = tf.reduce_sum(tf.square(y))
        return [y, *tape.gradient(loss, net.trainable_weights)]

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    keras.utils.set_random_seed(5)  # the same dropout masks for both networks
    return step()


def _assert_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is not None
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=RTOL * np.abs(e).max())


@pytest.mark.parametrize("inputs", [{}, {"num_labels": 3, "augment_dim": 9}])
def test_the_weights_and_layers_are_the_plain_networks(inputs):
    plain, recomputing = _pair(dataclasses.replace(TINY, dropout=0.1), **inputs)
    assert [(variable_key(v), tuple(v.shape)) for v in recomputing.weights] == \
        [(variable_key(v), tuple(v.shape)) for v in plain.weights]
    assert [layer.name for layer in recomputing.layers] == [layer.name for layer in plain.layers]
    assert recomputing.count_params() == plain.count_params()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_same_output_and_gradients(mode, dropout):
    # With dropout the blocks run in two parts around it, so the mask the forward pass drew is the one the
    # recomputed backward pass uses: a mask drawn again would change the gradients, not the output.
    plain, recomputing = _pair(dataclasses.replace(TINY, dropout=dropout))
    expected = _output_and_gradients(plain, mode)
    _assert_close(_output_and_gradients(recomputing, mode), expected)
    if dropout:  # dropout was on: the training-mode output is not the inference one
        inference = plain([tf.random.stateless_normal([2, 16, 16, 3], [1, 2]), tf.constant([3, 40])])
        assert not np.allclose(expected[0], inference, atol=1e-3)


def test_same_gradients_under_xla():
    # XLA (train.jit_compile, on by default on GPUs) ignores control dependencies; tf.recompute_grad orders the
    # recomputation by a data dependency instead. One level, 8x8: XLA compiles slowly on a CPU.
    cfg = dataclasses.replace(TINY, base_channels=8, channel_mult=(1,), attention_resolutions=(4,), norm_groups=4)
    plain, recomputing = _pair(cfg, size=8)
    _assert_close(_output_and_gradients(recomputing, "xla", size=8), _output_and_gradients(plain, "eager", size=8))


def test_the_backward_pass_runs_the_blocks_again():
    # What saves the memory: the gradient graph convolves again (the 3x3 convs and skips of the residual blocks)
    # instead of reading stored activations.
    def convolutions(net):
        x, t = tf.TensorSpec([2, 16, 16, 3]), tf.TensorSpec([2], tf.int32)

        def step(x, t):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(net([x, t], training=True))
            return tape.gradient(loss, net.trainable_weights)

        ops = tf.function(step).get_concrete_function(x, t).graph.get_operations()
        return sum(op.type == "Conv2D" for op in ops)

    plain, recomputing = _pair()
    block_convs = sum(isinstance(layer, keras.layers.Conv2D) and residual_block(layer.name) is not None
                      for layer in plain.layers)
    assert convolutions(recomputing) == convolutions(plain) + block_convs


def test_checkpoints_and_exports_load_either_way(tmp_path):
    # A run may turn model.recompute on or off: its checkpoints and exports hold the same objects and names.
    plain, recomputing = _pair(dataclasses.replace(TINY, dropout=0.1))
    keras.utils.set_random_seed(7)
    fresh = build_unet(dataclasses.replace(TINY, dropout=0.1, recompute=True), 16, 3)
    saved = tf.train.Checkpoint(net=plain).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(net=fresh).restore(saved).assert_consumed()
    for a, b in zip(fresh.weights, plain.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    save_weights(recomputing, tmp_path / "ema.npz", {"step": 1})
    keras.utils.set_random_seed(8)
    other = build_unet(dataclasses.replace(TINY, dropout=0.1), 16, 3)
    load_weights(other, tmp_path / "ema.npz")
    for a, b in zip(other.weights, recomputing.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_model_cost_estimates_less_memory_with_recompute(tmp_path):
    # scripts/model_cost.py measures the forward tensors the backward pass reads in the traced training graph.
    import importlib.util
    from pathlib import Path

    from conftest import write_config

    from ddpm_tf.config import load_config

    path = Path(__file__).parent.parent / "scripts" / "model_cost.py"
    spec = importlib.util.spec_from_file_location("model_cost", path)
    model_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_cost)
    cfg = load_config(write_config(tmp_path / "tiny.yaml", {"train": {"batch_size": 8}}))
    try:
        r = model_cost.estimate(cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert r["state_gb"] * 1e9 == pytest.approx(20 * r["params"])
    assert 0 < r["activations_gb"]["recompute"] < 0.7 * r["activations_gb"]["plain"]
    assert r["train_gflop_per_image"] < r["train_gflop_per_image_recompute"] < 4 * r["forward_gflop_per_image"]
    assert "ESTIMATE" in model_cost.report(r)
