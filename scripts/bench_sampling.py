"""Seconds to a grid of N images from a trained run, per sampler (a benchmark, not a test).

    python scripts/bench_sampling.py --run runs/demo --n 64
    python scripts/bench_sampling.py --run runs/demo --samplers ddim:50,dpmpp_2m:20

For each sampler: the seconds to one grid as a user sees them (the one-time graph trace included,
TensorFlow's import and the weight loading not) and network evaluations per second. Run it with a ddpm_tf environment's python
(`$(bash scripts/setup.sh | tail -n 1)/bin/python`). Compare ratios within one session only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--samplers", default="ddpm:1000,ddim:50,dpmpp_2m:20", help="name:steps,...")
    args = ap.parse_args()

    import numpy as np

    from ddpm_tf.compat import TF_VERSION
    from ddpm_tf.runs import load_run
    from ddpm_tf.samplers import sampler_from_config

    run, cfg, net, step, _ = load_run(args.run, args.run.parent)
    shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    seeds = np.arange(args.n)
    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        sampler = sampler_from_config(net, cfg, name, int(steps))
        t0 = time.perf_counter()
        sampler(seeds, shape)
        seconds = time.perf_counter() - t0
        rows.append({"sampler": name, "steps": sampler.num_steps, "n": args.n, "grid_s": round(seconds, 2),
                     "evals_per_s": round(args.n * sampler.num_steps / seconds, 1)})
        print(json.dumps({"tf": TF_VERSION, "run": str(run.path), "step": step, **rows[-1]}), flush=True)
    print(f"\n{'sampler':<10} {'steps':>5} {'grid s':>8} {'evals/s':>8}")
    for r in rows:
        print(f"{r['sampler']:<10} {r['steps']:>5} {r['grid_s']:>8} {r['evals_per_s']:>8}")


if __name__ == "__main__":
    main()
