"""What non-leaky augmentation (train.augment_p) costs the training input pipeline: milliseconds per batch of
training's own tf.data pipeline with and without it, alternated round by round; compare with a train step's time
from `ddpm bench` (bench32: about 1 s per batch of 16 on a 2-core CPU). Prints figures, asserts nothing.

    python scripts/bench_augment.py                      # bench32's shape: 32x32x3, batch 16, p = 0.15
    python scripts/bench_augment.py --size 64 --batch 64 --p 0.12
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def ms_per_batch(images, batch: int, p: float, batches: int) -> float:
    """Mean milliseconds per batch drawn from the (prefetching) training pipeline, after a short warm-up."""
    from ddpm_tf.data.pipeline import make_dataset

    it = iter(make_dataset(images, batch, seed=0, augment_p=p))
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--p", type=float, default=0.15)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (4 * args.batch, args.size, args.size, 3), dtype=np.uint8)
    times: dict[float, list[float]] = {0.0: [], args.p: []}
    for _ in range(args.rounds):  # alternated: a noisy neighbour slows both alike
        for p in times:
            times[p].append(ms_per_batch(images, args.batch, p, args.batches))
    off, on = min(times[0.0]), min(times[args.p])
    print(f"{args.size}x{args.size}x3, batch {args.batch}, best of {args.rounds} rounds of {args.batches} batches")
    print(f"augment_p 0: {off:.2f} ms/batch; augment_p {args.p:g}: {on:.2f} ms/batch; augmentation adds "
          f"{on - off:.2f} ms per batch (all rounds: off {[round(t, 2) for t in times[0.0]]}, "
          f"on {[round(t, 2) for t in times[args.p]]})")


if __name__ == "__main__":
    main()
