"""Parameters, FLOPs and an estimate of the training memory of a config's network (no training, no GPU needed).

    python scripts/model_cost.py configs/portrait128.yaml
    python scripts/model_cost.py configs/portrait64.yaml --set train.batch_size=32 --json

Forward GFLOP per image are counted from the layer shapes (`unet.forward_flops`, as `ddpm bench` does); a trained
image costs about 3 forward passes (forward, gradients of the inputs, gradients of the weights), and with
`model.recompute` one more forward pass of the residual blocks.

Memory is an estimate, for both settings of `model.recompute`, at the config's `train.batch_size` (one micro-batch
of `train.accumulate`) and `train.precision`:
- the training state, float32 whatever the precision: weights, Adam's two moments, the EMA copy and the
  gradients, 20 bytes per parameter, 4 more with `train.accumulate` > 1 (the gradient sum);
- the activations kept for the backward pass, measured in the traced training graph: the forward tensors that
  a backward op reads, traced (not run) at batches 2 and 4 under the precision's Keras policy (as on a GPU) and
  extrapolated linearly to the batch. With recompute that is the residual blocks' inputs (and dropout's masks and
  outputs, which stay outside the recomputed parts) plus, while one block runs again in the backward pass, what
  recomputing saved on it (the largest block's, counted once).
Not counted: the CUDA context and cuDNN workspaces (about 1 GB on a GPU), XLA's fusions (which keep fewer
tensors) and the allocator's fragmentation. Run it with a ddpm_tf environment's python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ddpm_tf

STATE_BYTES = 4 * 5  # float32 weights, Adam m and v, EMA copy, gradients
ACCUMULATE_BYTES = 4  # the float32 gradient sum of train.accumulate > 1
PROBE_BATCHES = (2, 4)
GB = 1e9


def kept_tensors(net, batch: int) -> tuple[float, dict[str, float]]:
    """(bytes, {residual block: bytes}) of the forward tensors a backward op reads, in the traced training graph
    of `net` at `batch`: what stays alive from the forward pass until the backward pass uses it."""
    from ddpm_tf.compat import tf
    from ddpm_tf.unet import residual_block

    size, channels = net.inputs[0].shape[1], net.inputs[0].shape[-1]
    forward_ops = []

    def step(x, t):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(net([x, t], training=True) - x))
        forward_ops.append(len(tf.compat.v1.get_default_graph().get_operations()))  # ops up to here: forward
        return tape.gradient(loss, net.trainable_weights)

    specs = tf.TensorSpec([batch, size, size, channels]), tf.TensorSpec([batch], tf.int32)
    ops = tf.function(step).get_concrete_function(*specs).graph.get_operations()
    forward = {op.name for op in ops[:forward_ops[0]]}
    kept = {t.ref() for op in ops[forward_ops[0]:] for t in op.inputs if t.op.name in forward}
    total, per_block = 0.0, defaultdict(float)
    for tensor in (ref.deref() for ref in kept):
        if tensor.op.type in ("Const", "ReadVariableOp", "VarHandleOp") or tensor.dtype in (tf.resource, tf.variant):
            continue  # the weights are counted as training state
        dims = tensor.shape.as_list() if tensor.shape.rank is not None else [None]
        if None in dims:
            raise SystemExit(f"model_cost: {tensor.name} has no static shape {dims}: cannot size it")
        n = tensor.dtype.size
        for d in dims:
            n *= d
        total += n
        block = residual_block(tensor.op.name)
        if block:
            per_block[block] += n
    return total, per_block


def kept_at(cfg, recompute: bool, batch: int) -> tuple[float, dict[str, float]]:
    """`kept_tensors` of `cfg`'s network with `recompute` at `batch`."""
    from ddpm_tf.compat import keras
    from ddpm_tf.unet import build_unet

    keras.backend.clear_session()
    net = build_unet(dataclasses.replace(cfg.model, recompute=recompute), cfg.data.image_size, cfg.data.channels)
    return kept_tensors(net, batch)


def at_batch(values: dict, batch: int) -> float:
    """The line through {PROBE_BATCHES[i]: value} at `batch`: activations grow linearly with the batch."""
    (b1, y1), (b2, y2) = sorted(values.items())
    return y1 + (y2 - y1) / (b2 - b1) * (batch - b1)


def estimate(cfg) -> dict:
    """Parameters, FLOPs and the memory estimate of `cfg`'s network at its batch size and precision."""
    from ddpm_tf.precision import apply_policy
    from ddpm_tf.unet import build_unet, forward_flops, layer_flops, residual_block

    apply_policy(cfg.train.precision, "keras")  # the GPU's graph: activations in the compute dtype
    net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels)
    params = net.count_params()
    flops = forward_flops(cfg.model, cfg.data.image_size, cfg.data.channels)
    block_flops = sum(layer_flops(layer) for layer in net.layers if residual_block(layer.name))
    batch, accumulate = cfg.train.batch_size, cfg.train.accumulate
    state = params * (STATE_BYTES + (ACCUMULATE_BYTES if accumulate > 1 else 0))

    plain = {b: kept_at(cfg, False, b) for b in PROBE_BATCHES}
    recomputing = {b: kept_at(cfg, True, b) for b in PROBE_BATCHES}
    # While a block runs again in the backward pass, what recomputation saved on it exists again: the largest such
    # block counts once on top of what the recomputing graph keeps.
    again = {b: max(plain[b][1][k] - recomputing[b][1].get(k, 0.0) for k in plain[b][1]) for b in PROBE_BATCHES}
    activations = {
        "plain": lambda b: at_batch({k: v[0] for k, v in plain.items()}, b),
        "recompute": lambda b: at_batch({k: v[0] for k, v in recomputing.items()}, b) + at_batch(again, b),
    }
    at = {k: f(batch) for k, f in activations.items()}
    return {
        "config": str(cfg.run.dir), "image_size": cfg.data.image_size, "channels": cfg.data.channels,
        "precision": cfg.train.precision, "batch_size": batch, "accumulate": accumulate, "params": params,
        "forward_gflop_per_image": flops / 1e9, "residual_block_share_of_forward": block_flops / flops,
        "train_gflop_per_image": 3 * flops / 1e9, "train_gflop_per_image_recompute": (3 * flops + block_flops) / 1e9,
        "state_gb": state / GB, "activations_gb": {k: v / GB for k, v in at.items()},
        "activations_mb_per_image": {k: (f(batch + 1) - f(batch)) / 1e6 for k, f in activations.items()},
        "total_gb": {k: (state + v) / GB for k, v in at.items()},
    }


def report(r: dict) -> str:
    """The estimate as lines of text that say what they are."""
    micro = f"batch {r['batch_size']}" + (f" (x{r['accumulate']} accumulated)" if r["accumulate"] > 1 else "")
    lines = [
        f"{r['image_size']}x{r['image_size']}x{r['channels']}, {r['precision']}, {micro}",
        f"parameters:            {r['params']:,} ({r['params'] / 1e6:.1f}M)",
        f"forward GFLOP / image: {r['forward_gflop_per_image']:.1f} (counted from the layer shapes; residual "
        f"blocks {100 * r['residual_block_share_of_forward']:.0f} %)",
        f"train GFLOP / image:   {r['train_gflop_per_image']:.1f} (about 3x forward), "
        f"{r['train_gflop_per_image_recompute']:.1f} with model.recompute (+ the residual blocks' forward again)",
        "training memory, an ESTIMATE (not measured on a GPU; CUDA context, cuDNN workspace and fragmentation not "
        "included, about 1 GB more):",
        f"  weights + Adam (2 slots) + EMA + gradients, float32: {r['state_gb']:.2f} GB",
    ]
    for key, label in (("plain", "model.recompute: false"), ("recompute", "model.recompute: true ")):
        lines.append(f"  {label}  activations {r['activations_gb'][key]:6.2f} GB "
                     f"({r['activations_mb_per_image'][key]:.0f} MB per image)  total {r['total_gb'][key]:6.2f} GB")
    lines.append("  activations: the forward tensors the backward pass reads, measured in the traced training graph "
                 "at batches 2 and 4, extrapolated to the batch (see this script's docstring)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", action="store_true", help="one JSON line instead of the text")
    args = ap.parse_args()

    from ddpm_tf.config import load_config
    from ddpm_tf.errors import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"model_cost: {exc}") from None
    result = estimate(cfg)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
