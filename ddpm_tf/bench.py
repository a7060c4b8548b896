"""`ddpm bench`: train-step and sampler throughput of a configured network on this machine.

Figures are printed, never asserted: machines are shared and noisy, so compare ratios measured in
one session (scripts/bench_compare.py alternates this with the reference and the diffusers peer).
"""

from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np

from . import compat
from .compat import keras, tf


def peak_memory_mb() -> float | None:
    """Peak GPU memory when on a GPU, else the process's peak resident set size, in MiB."""
    if tf.config.list_physical_devices("GPU"):
        try:
            return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        except (ValueError, RuntimeError):
            return None
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return details.get("device_name", "GPU")
    return f"CPU ({platform.processor() or platform.machine()})"


class _StepTimer(keras.callbacks.Callback):
    """Wall time from the start of step `skip` to the end of the last step."""

    def __init__(self, skip: int):
        super().__init__()
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None and "step_loss" in logs:
            float(logs["step_loss"])  # wait for the step to finish
        self.end = time.perf_counter()

    def seconds(self) -> float:
        return self.end - self.start


def _train_images_per_s(model, cfg, global_batch: int, steps: int, warmup: int) -> float:
    """Training images per second of `model` on training's own endless input pipeline (flips, augmentation) over
    random images: one fit, timed from its first step after `warmup` to its last."""
    from .data.pipeline import make_dataset

    size, channels = cfg.data.image_size, cfg.data.channels
    images = np.random.default_rng(0).integers(0, 256, (global_batch * 4, size, size, channels), dtype=np.uint8)
    ds = make_dataset(images, global_batch, seed=0, flip=cfg.data.flip, augment_p=cfg.train.augment_p)
    timer = _StepTimer(warmup)
    model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, verbose=0, shuffle=False, callbacks=[timer])
    return global_batch * steps / timer.seconds()


def _scaling(cfg, one_model, batch_size: int, replicas: int, steps: int, warmup: int, rounds: int) -> dict:
    """One device against `replicas` mirrored ones at the same per-replica batch, alternated round by round in
    this process: images/s of each, per replica, and the scaling efficiency (per-replica rate / one device's)."""
    from .diffusion import build_diffusion_model
    from .distribute import mirrored

    placement = mirrored(replicas)
    with placement.strategy.scope():
        many_model = build_diffusion_model(cfg, seed=0)[0]
    one_ips, many_ips = 0.0, 0.0
    for _ in range(rounds):  # alternated: a noisy neighbour slows both alike
        one_ips = max(one_ips, _train_images_per_s(one_model, cfg, batch_size, steps, warmup))
        many_ips = max(many_ips, _train_images_per_s(many_model, cfg, batch_size * replicas, steps, warmup))
    return {"replicas": replicas, "devices": placement.strategy.extended.worker_devices,
            "one_device_img_per_s": one_ips, "replicas_img_per_s": many_ips,
            "replica_img_per_s": many_ips / replicas, "scaling_efficiency": many_ips / replicas / one_ips}


def run_bench(cfg, *, batch_size: int, steps: int = 4, warmup: int = 2, sample_n: int = 16,
              sample_steps: int = 10, replicas: int = 1, rounds: int = 2, echo=print) -> dict:
    """Time `steps` train steps and `sample_steps` sampler steps of the network `cfg` describes; with `replicas`,
    training on that many mirrored devices too (per-replica batch `batch_size`)."""
    from .diffusion import build_diffusion_model
    from .samplers import Sampler
    from .unet import forward_flops

    size, channels = cfg.data.image_size, cfg.data.channels
    model, xla = build_diffusion_model(cfg, seed=0)
    net, ema_net, schedule = model.net, model.ema_net, model.schedule
    if replicas > 1:
        scaling = _scaling(cfg, model, batch_size, replicas, steps, warmup, rounds)
        train_ips = scaling["one_device_img_per_s"]
    else:
        scaling = {}
        train_ips = _train_images_per_s(model, cfg, batch_size, steps, warmup)

    sampler = Sampler(ema_net, schedule, "ddpm", jit_compile=xla, chunks=max(1, schedule.timesteps // sample_steps),
                      prediction=cfg.diffusion.prediction)
    x = tf.random.normal([sample_n, size, size, channels])
    zeros, seeds = tf.zeros_like(x), tf.constant(np.arange(sample_n), tf.int32)
    sampler.run_steps(x, zeros, seeds, 0, 1)[0].numpy()  # trace + warm-up
    t0 = time.perf_counter()
    sampler.run_steps(x, zeros, seeds, 0, sample_steps)[0].numpy()
    sample_s = time.perf_counter() - t0

    gflop = forward_flops(cfg.model, size, channels) / 1e9
    result = {
        "impl": "ddpm_tf", "tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION, "device": device_name(),
        "precision": cfg.train.precision, "xla": xla, "image_size": size, "batch": batch_size,
        "augment_p": cfg.train.augment_p,
        "params": int(net.count_params()), "forward_gflop_per_image": round(gflop, 4),
        "train_img_per_s": train_ips, "sample_evals_per_s": sample_n * sample_steps / sample_s,
        "sample_s_per_step": sample_s / sample_steps,
        # Training costs about 3 forward passes per image (forward + backward for inputs and weights).
        "train_gflop_per_s": train_ips * 3 * gflop,
        "sample_gflop_per_s": sample_n * sample_steps / sample_s * gflop,
        "peak_memory_mb": peak_memory_mb(),
        **scaling,
    }
    return result


def format_table(result: dict) -> str:
    """A readable two-column table of a bench result."""
    rows = [
        ("TensorFlow / Keras", f"{result['tf']} / {result['keras']}"),
        ("device", result["device"]),
        ("precision, XLA", f"{result['precision']}, {'on' if result['xla'] else 'off'}"),
        ("image size, batch", f"{result['image_size']}, {result['batch']}"),
        ("augmentation p", f"{result.get('augment_p', 0):g}"),
        ("parameters", f"{result['params']:,}"),
        ("forward GFLOP / image", f"{result['forward_gflop_per_image']:.3f}"),
        ("train images / s", f"{result['train_img_per_s']:.1f}"),
        ("train GFLOP / s", f"{result['train_gflop_per_s']:.0f}"),
        ("sampler evals / s", f"{result['sample_evals_per_s']:.1f}"),
        ("sampler GFLOP / s", f"{result['sample_gflop_per_s']:.0f}"),
        ("peak memory (MiB)", "n/a" if result["peak_memory_mb"] is None else f"{result['peak_memory_mb']:.0f}"),
    ]
    if result.get("replicas", 1) > 1:
        rows += [
            ("replicas (mirrored)", f"{result['replicas']}: {', '.join(result['devices'])}"),
            ("train images / s, all", f"{result['replicas_img_per_s']:.1f} (one device: "
                                      f"{result['one_device_img_per_s']:.1f})"),
            ("train images / s / replica", f"{result['replica_img_per_s']:.1f}"),
            ("scaling efficiency", f"{result['scaling_efficiency']:.2f} (per-replica rate / one device's)"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(result: dict) -> str:
    return json.dumps(result)
