"""What the web page adds to generating images: the same request through `ddpm ui` (Gradio's HTTP API, as the
Generate button sends it) against `ddpm sample` in a terminal and against the generation engine called directly,
the three alternated round after round so that a load on the machine hits all of them alike.

    python scripts/bench_ui.py --run runs/demo --n 16 --sampler ddim --steps 50 --repeat 3
    python scripts/bench_ui.py --config configs/demo.yaml ...   # an untrained run of that network (same cost)

Prints, per round and as medians:
  terminal  wall time of `ddpm sample --run RUN --seeds ...` (start to exit: Python, TensorFlow, the network,
            the trace, the sampling, the PNGs), what a person typing the command waits;
  page      the Generate request from submit to the images fetched as the browser fetches them (the gallery
            and the grid), the run loaded and traced once by the first request (reported apart as 'page, first');
  engine    generation.generate on a LoadedRun kept in this process: the sampling and PNGs alone.
The page's overhead is page / engine - 1 (Gradio's queue, HTTP, copying the results to its cache). Samples go to
the run's samples/ folder; run it on a copy of a run if that matters.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ddpm_tf.cli", "ui", "--runs", str(run.parent),
                                    "--configs", str(run.parent), "--port", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process, url
        except OSError:
            if process.poll() is not None:
                sys.exit(f"ddpm ui did not start:\n{log.read_text(encoding='utf-8', errors='replace')}")
            time.sleep(0.5)


def untrained_run(config: Path, folder: Path) -> Path:
    """A run of `config`'s network with its initial (untrained) EMA weights exported: sampling costs the same."""
    from ddpm_tf import compat
    from ddpm_tf.config import load_config
    from ddpm_tf.runs import RunDir, save_weights
    from ddpm_tf.unet import build_unet

    cfg = load_config(config, [f"run.dir={folder}"])
    run = RunDir(folder)
    run.claim()
    run.save_config(cfg)
    net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels, name="ema_unet")
    save_weights(net, run.export_path(0), {"tf": compat.TF_VERSION, "keras": compat.KERAS_VERSION})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a trained run directory")
    source.add_argument("--config", type=Path, help="bench an untrained run of this config's network")
    parser.add_argument("--n", type=int, default=16, help="images per request")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=0, help="0: the sampler's default")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of terminal, page and engine")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    scratch = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    run = (args.run or untrained_run(args.config, scratch / "runs" / args.config.stem)).resolve()
    seeds = ",".join(str(s) for s in range(args.n))
    terminal_cmd = [sys.executable, "-m", "ddpm_tf.cli", "sample", "--run", str(run), "--seeds", seeds,
                    "--sampler", args.sampler, "--batch-size", str(args.n)] + \
        (["--steps", str(args.steps)] if args.steps else [])

    from gradio_client import Client

    from ddpm_tf.generation import LoadedRun, generate

    log = scratch / "ui.log"
    process, url = start_page(run, log)
    try:
        # As a browser: the results come back as URLs, and the images the page shows (the gallery and the grid)
        # are fetched from the page; the download list is not.
        client = Client(url, verbose=False, download_files=False)
        request = dict(run=run.name, checkpoint=None, sampler=args.sampler, steps=args.steps, eta=0, seeds=seeds,
                       first_seed=0, n=args.n, class_name="", tags="", guidance=1)

        def page() -> float:
            t0 = time.perf_counter()
            gallery, grid, *_ = client.predict(*request.values(), api_name="/generate")
            shown = [item["image"]["url"] for item in gallery] + [grid["url"]]
            assert len(shown) == args.n + 1, shown
            for link in shown:
                urllib.request.urlopen(link, timeout=60).read()
            return time.perf_counter() - t0

        loaded = LoadedRun.load(run)

        def engine() -> float:
            t0 = time.perf_counter()
            generate(loaded, seeds=list(range(args.n)), batch_size=args.n, sampler=args.sampler,
                     steps=args.steps or None, echo=lambda msg: None)
            return time.perf_counter() - t0

        def terminal() -> float:
            t0 = time.perf_counter()
            subprocess.run(terminal_cmd, check=True, capture_output=True)
            return time.perf_counter() - t0

        first_page = page()  # loads the run and traces the sampler in the page's process
        engine()  # the same warm-up in this process
        times = {"terminal": [], "page": [], "engine": []}
        for i in range(args.repeat):
            for name, fn in (("terminal", terminal), ("page", page), ("engine", engine)):
                times[name].append(fn())
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.n} images, {args.sampler} {args.steps or 'default'} steps, run {run}")
    print(f"  terminal (ddpm sample, start to exit)  {med['terminal']:7.2f} s  median of {args.repeat}")
    print(f"  page, first request (loads the run)     {first_page:7.2f} s")
    print(f"  page, Generate to images                {med['page']:7.2f} s  median of {args.repeat}")
    print(f"  engine alone (generation.generate)      {med['engine']:7.2f} s  median of {args.repeat}")
    print(f"  the page adds {100 * (med['page'] / med['engine'] - 1):+.1f} % to the engine; "
          f"page vs terminal {100 * (med['page'] / med['terminal'] - 1):+.1f} % (first request "
          f"{100 * (first_page / med['terminal'] - 1):+.1f} %)")


if __name__ == "__main__":
    main()
