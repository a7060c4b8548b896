"""Seconds to a grid of N images from a trained run, per sampler (a benchmark, not a test).

    python scripts/bench_sampling.py --run runs/demo --n 64
    python scripts/bench_sampling.py --run runs/demo --samplers ddim:50,dpmpp_2m:20
    python scripts/bench_sampling.py --run runs/demo-people --samplers ddim:50 --guidance 1,3 --repeat 3

With --guidance on a run with labels, each sampler runs at each scale, alternated, conditioned on the first
class: W = 1 is one network pass per step, any other W the batched conditional + unconditional pass, so the
ratio of seconds is the cost of classifier-free guidance per image (at most 2x by construction).

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
    ap.add_argument("--guidance", default=None, help="W,W,... (a run with labels)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds, alternating the settings")
    args = ap.parse_args()

    import numpy as np

    from ddpm_tf.compat import TF_VERSION
    from ddpm_tf.runs import load_run
    from ddpm_tf.samplers import sampler_from_config

    run, cfg, net, step, label_set = load_run(args.run, args.run.parent)
    shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
    seeds = np.arange(args.n)
    scales = [float(w) for w in args.guidance.split(",")] if args.guidance else [None]
    labels = np.tile(label_set.vector([label_set.names[0]]), (args.n, 1)) if label_set and args.guidance else None
    samplers = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        for w in scales:
            samplers.append((sampler_from_config(net, cfg, name, int(steps), guidance=w), w))
    times: dict[int, list[float]] = {}
    for _ in range(args.repeat):  # alternated: every setting once per round
        for i, (sampler, w) in enumerate(samplers):
            t0 = time.perf_counter()
            sampler(seeds, shape, labels=labels)
            times.setdefault(i, []).append(time.perf_counter() - t0)
    rows = []
    for i, (sampler, w) in enumerate(samplers):
        seconds = min(times[i][1:] or times[i])  # the first round includes the graph trace
        rows.append({"sampler": sampler.name, "steps": sampler.num_steps, "n": args.n, "guidance": w,
                     "grid_s": round(seconds, 2), "evals_per_s": round(args.n * sampler.num_steps / seconds, 1)})
        print(json.dumps({"tf": TF_VERSION, "run": str(run.path), "step": step, **rows[-1]}), flush=True)
    print(f"\n{'sampler':<10} {'steps':>5} {'W':>5} {'grid s':>8} {'images/s':>8} {'x W=1':>6}")
    base = {r["sampler"]: r["grid_s"] for r in rows if r["guidance"] in (None, 1.0)}
    for r in rows:
        ratio = f"{r['grid_s'] / base[r['sampler']]:.2f}" if r["sampler"] in base else "-"
        print(f"{r['sampler']:<10} {r['steps']:>5} {str(r['guidance'] or '-'):>5} {r['grid_s']:>8} "
              f"{r['n'] / r['grid_s']:>8.2f} {ratio:>6}")


if __name__ == "__main__":
    main()
