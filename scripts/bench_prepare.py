"""Images per second of `ddpm prepare` on generated 512x512 JPEGs (a benchmark, not a test).

    python scripts/bench_prepare.py                 # 1,000 JPEGs -> 64x64 RGB
    python scripts/bench_prepare.py --n 200 --size 32

Generates photo-like JPEGs (smooth colour fields with noise, ~512x512, quality 90) in a temporary folder,
then times `prepare` from an empty cache: serial and parallel decoding, each with and without JPEG draft
mode, and a warm re-run of the parallel one (an unchanged folder: hashes checked, nothing decoded).
Run it with a ddpm_tf environment's python; compare ratios within one session only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """n photo-like JPEGs: a bilinear-upscaled 8x8 colour field plus fine noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BILINEAR)
        noisy = np.asarray(field, np.int16) + rng.integers(-12, 13, (side, side, 3), dtype=np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def timed(data_cfg, draft: bool) -> tuple[float, int]:
    from ddpm_tf.data.prepare import prepare

    start = time.perf_counter()
    result = prepare(data_cfg, echo=lambda text: None, draft=draft)
    return time.perf_counter() - start, result.decoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    args = ap.parse_args()

    from ddpm_tf.config import DataConfig

    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        make_jpegs(src, args.n, args.side)
        mb = sum(p.stat().st_size for p in src.iterdir()) / 2**20
        print(f"generated {args.n} {args.side}x{args.side} JPEGs ({mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        rows = []
        for name, w, draft in (("serial, draft off", 1, False), ("serial, draft on", 1, True),
                               ("parallel, draft off", workers, False), ("parallel, draft on", workers, True)):
            cfg = DataConfig(dir=str(src), image_size=args.size, cache=str(Path(tmp) / name.replace(", ", "-")),
                             workers=w, near_duplicate_threshold=-1)
            seconds, decoded = timed(cfg, draft)
            rows.append((name, w, seconds, decoded))
            if name == "parallel, draft on":
                seconds, decoded = timed(cfg, draft)
                rows.append(("warm re-run (nothing to decode)", w, seconds, decoded))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, prepare -> {args.size}x{args.size} RGB")
    print(f"{'case':<34}{'workers':>8}{'seconds':>9}{'decoded':>9}{'images/s':>10}")
    for name, w, seconds, decoded in rows:
        print(f"{name:<34}{w:>8}{seconds:>9.2f}{decoded:>9}{args.n / seconds:>10.0f}")
    print(json.dumps({name: round(args.n / seconds, 1) for name, _, seconds, _ in rows}))


if __name__ == "__main__":
    main()
