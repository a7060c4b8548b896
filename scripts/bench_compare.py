"""Compare ddpm_tf's throughput with the reference design and with a PyTorch/diffusers peer.

Measures, on the same network configuration and in one session, train images/s and sampler network
evaluations/s of three competitors, each in its own subprocess:

  ours       `ddpm bench --config configs/CONFIG.yaml --precision P --json-only` (every precision asked for)
  reference  ../shared/bench/seed_baseline.py, float32 only, with the SAME venv's python
  peer       ../shared/bench/peer_diffusers.py --mode fp32|bf16 (diffusers UNet2DModel on PyTorch CPU;
             bench32 only), in its own venv, built on first use as its docstring says

Each round runs every competitor once; the order is reversed on every other round so that drift on a
shared machine hits all competitors alike. Printed: medians over rounds (and each run's values), the
ratios ours / reference and ours / peer per precision, and our train GFLOP/s against the large-convolution
figures of ../shared/bench/README.md (210 GFLOP/s float32, 780 bfloat16). Raw results go to --out as JSON.
Absolute numbers drift on shared machines: quote ratios from one session only.

Run from the repository (any python3; it only starts subprocesses):

    python scripts/bench_compare.py --rounds 2
    python scripts/bench_compare.py --rounds 1 --precisions float32 --steps 4
    python scripts/bench_compare.py --config portrait64 --batch 64 --rounds 1
    python scripts/bench_compare.py --ddpm-env "$(bash scripts/setup.sh tf210 | tail -n 1)"

Environments: ours and the reference use `bash scripts/setup.sh latest` (or --ddpm-env DIR). The peer's
venv lives at $DDPM_PEER_ENV, default ~/.cache/ddpm_tf/envs/peer-diffusers ($DDPM_ENV_ROOT moves the
parent, as for setup.sh); when PyTorch cannot be installed the comparison goes on without the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_GFLOPS = {"float32": 210.0, "mixed_bfloat16": 780.0}  # ../shared/bench/README.md, 2-core machine
PEER_MODES = {"float32": "fp32", "mixed_bfloat16": "bf16"}
CONFIGS = {
    "bench32": {"yaml": "configs/bench32.yaml", "size": 32, "widths": "32,64,128,256", "batch": 16},
    "portrait64": {"yaml": "configs/portrait64.yaml", "size": 64, "widths": "64,128,256,512", "batch": 64},
}
PEER_BATCH, PEER_CONFIG = 16, "bench32"  # peer_diffusers.py is fixed at bench32, batch 16, 4 timed steps
SAMPLE_N, SAMPLE_STEPS = 16, 10
TORCH_PIN, DIFFUSERS_PIN = "torch==2.13.0", "diffusers==0.42.1"
# The docstring's list plus requests: diffusers 0.42.1 declares it and imports it at `import diffusers`, but
# huggingface_hub 2.x (httpx) no longer pulls it in, so the list as written leaves a venv that cannot import.
PEER_DEPS = ["huggingface_hub", "safetensors", "regex", "filelock", "importlib_metadata", "pillow", "numpy",
             "requests"]
PEER_MARKER = ".peer_diffusers_ready"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="bench32", help="network configuration")
    p.add_argument("--batch", type=int, default=None,
                   help="train batch for ours and the reference [default: 16 for bench32, 64 for portrait64]")
    p.add_argument("--precisions", default="float32,mixed_bfloat16",
                   help="comma-separated precisions for ours (float32, mixed_bfloat16)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every competitor once")
    p.add_argument("--steps", type=int, default=8, help="timed train steps for ours and the reference")
    p.add_argument("--ddpm-env", type=Path, default=None,
                   help="venv with ddpm_tf installed [default: `bash scripts/setup.sh latest`]")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                   help="folder holding bench/seed_baseline.py and bench/peer_diffusers.py")
    p.add_argument("--no-peer", action="store_true", help="leave out the diffusers peer")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before one run counts as failed")
    p.add_argument("--out", type=Path, default=None,
                   help="raw results JSON [default: runs/bench/compare-<timestamp>.json]")
    p.add_argument("--dry-run", action="store_true", help="print the commands of one round and stop")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    bad = [s for s in args.precisions if s not in PEAK_GFLOPS]
    if bad or not args.precisions:
        p.error(f"--precisions: expected float32 and/or mixed_bfloat16, got {args.precisions}")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    args.batch = args.batch or CONFIGS[args.config]["batch"]
    return args


def resolve_ddpm_env(env: Path | None) -> Path:
    """The venv with ddpm_tf and TensorFlow: --ddpm-env, else the one scripts/setup.sh builds or reuses."""
    if env is None:
        log("bench_compare: resolving the newest-TF environment with scripts/setup.sh latest ...")
        proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "latest"], cwd=REPO,
                              capture_output=True, text=True, encoding="utf-8", errors="replace", check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            log("\n".join(proc.stderr.strip().splitlines()[-15:]))
            sys.exit(f"bench_compare: scripts/setup.sh latest failed (exit {proc.returncode})")
        env = Path(lines[-1])
    env = env.expanduser().resolve()
    for exe in ("ddpm", "python"):
        if not (env / "bin" / exe).exists():
            sys.exit(f"bench_compare: {env / 'bin' / exe} not found (is {env} a ddpm_tf venv?)")
    return env


def peer_env_dir() -> Path:
    if os.environ.get("DDPM_PEER_ENV"):
        return Path(os.environ["DDPM_PEER_ENV"]).expanduser()
    root = Path(os.environ.get("DDPM_ENV_ROOT") or Path.home() / ".cache" / "ddpm_tf" / "envs")
    return root.expanduser() / "peer-diffusers"


def find_python311() -> str | None:
    """The torch wheel on this machine is for CPython 3.11, as the peer's docstring assumes."""
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    return shutil.which("python3.11")


def build_peer_env(env: Path) -> None:
    """The recipe of peer_diffusers.py's docstring; raises CalledProcessError/RuntimeError on failure."""
    py = find_python311()
    if py is None:
        raise RuntimeError("no python3.11 found (the torch 2.13.0 CPU wheel is for CPython 3.11)")
    log(f"bench_compare: building the peer venv {env} with {py} ({TORCH_PIN} CPU, {DIFFUSERS_PIN}) ...")
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n", encoding="utf-8")
        for cmd in ([py, "-m", "venv", str(env)],
                    pip + [TORCH_PIN],
                    pip + ["--no-deps", DIFFUSERS_PIN],
                    pip + ["-c", str(constraints)] + PEER_DEPS):
            log("  $ " + " ".join(cmd))
            subprocess.run(cmd, check=True, stdout=sys.stderr)
    check = [str(env / "bin" / "python"), "-c",
             "import torch; from diffusers import DDPMScheduler, UNet2DModel; print(torch.__version__)"]
    proc = subprocess.run(check, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError("the built venv cannot import torch and diffusers: "
                           + (proc.stderr.strip().splitlines() or ["?"])[-1])
    log(f"bench_compare: peer venv ready (torch {proc.stdout.strip()})")
    (env / PEER_MARKER).write_text(proc.stdout, encoding="utf-8")


def ensure_peer_env(notes: list[str]) -> Path | None:
    """The peer's python, building its venv when missing; None (and a note) when that fails."""
    env = peer_env_dir()
    if not (env / PEER_MARKER).exists():
        try:
            build_peer_env(env)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            notes.append(f"peer left out: building its venv {env} failed ({exc}); without PyTorch and "
                         "diffusers there is no ours / peer ratio")
            log("bench_compare: " + notes[-1])
            return None
    return env / "bin" / "python"


def plan_round(args: argparse.Namespace, ddpm_env: Path, peer_py: Path | None) -> list[dict]:
    """One round's runs, interleaved: per precision ours then the peer, the reference after float32."""
    cfg = CONFIGS[args.config]
    bench = args.shared / "bench"
    ref_cmd = [str(ddpm_env / "bin" / "python"), str(bench / "seed_baseline.py"), "--size", str(cfg["size"]),
               "--widths", cfg["widths"], "--batch", str(args.batch), "--steps", str(args.steps),
               "--sample-n", str(SAMPLE_N), "--sample-steps", str(SAMPLE_STEPS)]
    runs = []
    for precision in args.precisions:
        runs.append({"competitor": "ours", "precision": precision, "cmd": [
            str(ddpm_env / "bin" / "ddpm"), "bench", "--config", str(REPO / cfg["yaml"]),
            "--precision", precision, "--batch-size", str(args.batch), "--steps", str(args.steps),
            "--sample-n", str(SAMPLE_N), "--sample-steps", str(SAMPLE_STEPS), "--json-only"]})
        if precision == "float32":
            runs.append({"competitor": "reference", "precision": "float32", "cmd": ref_cmd})
        if peer_py is not None:
            mode = PEER_MODES[precision]
            runs.append({"competitor": "peer", "precision": precision,
                         "cmd": [str(peer_py), str(bench / "peer_diffusers.py"), "--mode", mode]})
    if "float32" not in args.precisions:  # ratios to the reference are always against its float32 run
        runs.insert(1, {"competitor": "reference", "precision": "float32", "cmd": ref_cmd})
    return runs


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_one(run: dict, timeout: float) -> dict:
    """Run one competitor; returns the run with `seconds`, `returncode`, and `result` or `error`."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(run["cmd"], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, check=False)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = None, "", f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    except OSError as exc:
        code, out, err = None, "", f"could not start: {exc}"
    done = dict(run, seconds=round(time.perf_counter() - t0, 1), returncode=code)
    result = last_json_line(out) if code == 0 else None
    if result is not None and "train_img_per_s" in result and "sample_evals_per_s" in result:
        done["result"] = result
    else:
        if isinstance(err, bytes):
            err = err.decode("utf-8", "replace")
        tail = "\n".join((err or out or "").strip().splitlines()[-15:])
        done["error"] = tail or "no JSON line on stdout"
    return done


def label(run: dict) -> str:
    if run["competitor"] == "peer":
        return f"peer {PEER_MODES[run['precision']]}"
    return f"{run['competitor']} {run['precision']}"


def report_progress(done: dict, index: int, total: int, rnd: int, rounds: int) -> None:
    head = f"[round {rnd + 1}/{rounds}, run {index + 1}/{total}] {label(done)}"
    if "result" in done:
        r = done["result"]
        log(f"{head}: train {r['train_img_per_s']:.1f} img/s, sampler {r['sample_evals_per_s']:.1f} evals/s "
            f"({done['seconds']:.0f} s)")
    else:
        log(f"{head}: FAILED (exit {done['returncode']}, {done['seconds']:.0f} s), excluded; stderr tail:")
        log("    " + done["error"].replace("\n", "\n    "))


def run_rounds(args: argparse.Namespace, plan: list[dict]) -> tuple[list[dict], list[float]]:
    """All rounds, the plan's order reversed on odd rounds; returns the runs and each round's seconds."""
    runs, round_seconds = [], []
    for rnd in range(args.rounds):
        order = plan if rnd % 2 == 0 else plan[::-1]
        t0 = time.perf_counter()
        for i, run in enumerate(order):
            done = dict(run_one(run, args.timeout), round=rnd)
            report_progress(done, i, len(order), rnd, args.rounds)
            runs.append(done)
        round_seconds.append(round(time.perf_counter() - t0, 1))
        log(f"[round {rnd + 1}/{args.rounds}] took {round_seconds[-1]:.0f} s")
    return runs, round_seconds


def summarize(runs: list[dict]) -> dict:
    """Medians and individual values per (competitor, precision), over successful runs."""
    summary: dict[str, dict] = {}
    for run in runs:
        key = f"{run['competitor']}/{run['precision']}"
        entry = summary.setdefault(key, {"competitor": run["competitor"], "precision": run["precision"],
                                         "label": label(run), "failed": 0, "train_img_per_s": [],
                                         "sample_evals_per_s": [], "train_gflop_per_s": []})
        if "result" not in run:
            entry["failed"] += 1
            continue
        for metric in ("train_img_per_s", "sample_evals_per_s", "train_gflop_per_s"):
            if run["result"].get(metric) is not None:
                entry[metric].append(run["result"][metric])
    for entry in summary.values():
        for metric in ("train_img_per_s", "sample_evals_per_s", "train_gflop_per_s"):
            values = entry[metric]
            entry[f"median_{metric}"] = statistics.median(values) if values else None
    return summary


def fmt_values(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def print_medians(summary: dict) -> None:
    runs = "(runs)"
    print(f"{'competitor':<20} {'train img/s':>11}  {runs:<20} {'sampler evals/s':>15}  {runs:<20} failed")
    for e in summary.values():
        cells = []
        for metric in ("train_img_per_s", "sample_evals_per_s"):
            median = e[f"median_{metric}"]
            cells += ["-" if median is None else f"{median:.1f}", f"[{fmt_values(e[metric])}]"]
        print(f"{e['label']:<20} {cells[0]:>11}  {cells[1]:<20} {cells[2]:>15}  {cells[3]:<20} {e['failed']}")


def ratio(summary: dict, ours: str, other: str, metric: str) -> float | None:
    a, b = summary.get(ours, {}).get(f"median_{metric}"), summary.get(other, {}).get(f"median_{metric}")
    return a / b if a and b else None


def compute_ratios(summary: dict, precisions: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        ours = f"ours/{precision}"
        for other, name in (("reference/float32", "reference float32"),
                            (f"peer/{precision}", f"peer {PEER_MODES[precision]}")):
            rows.append({"precision": precision, "against": name,
                         "train": ratio(summary, ours, other, "train_img_per_s"),
                         "sample": ratio(summary, ours, other, "sample_evals_per_s")})
    return rows


def print_ratios(rows: list[dict]) -> None:
    print(f"\n{'ours':<16} {'/ other':<20} {'train img/s':>11} {'sampler evals/s':>16}")
    for r in rows:
        cells = ["n/a" if v is None else f"{v:.2f}x" for v in (r["train"], r["sample"])]
        print(f"{r['precision']:<16} / {r['against']:<18} {cells[0]:>11} {cells[1]:>16}")


def gflops_rows(summary: dict, precisions: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        achieved = summary.get(f"ours/{precision}", {}).get("median_train_gflop_per_s")
        peak = PEAK_GFLOPS[precision]
        rows.append({"precision": precision, "train_gflop_per_s": achieved, "large_conv_gflop_per_s": peak,
                     "fraction": achieved / peak if achieved else None})
    return rows


def print_gflops(rows: list[dict]) -> None:
    print("\nour train GFLOP/s (median) against a large convolution on this kind of machine "
          "(docs/performance.md):")
    for r in rows:
        if r["train_gflop_per_s"] is None:
            print(f"  {r['precision']:<16} n/a")
            continue
        print(f"  {r['precision']:<16} {r['train_gflop_per_s']:6.1f} of {r['large_conv_gflop_per_s']:.0f}"
              f" GFLOP/s = {100 * r['fraction']:.0f} %")


def default_out() -> Path:
    return REPO / "runs" / "bench" / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def print_report(args: argparse.Namespace, summary: dict, notes: list[str]) -> tuple[list, list]:
    print(f"\nbench_compare: {args.config}, batch {args.batch} (peer: {PEER_BATCH}, 4 timed steps), "
          f"{args.steps} timed train steps, sampler {SAMPLE_N} images x {SAMPLE_STEPS} steps, "
          f"{args.rounds} round(s), medians over rounds\n")
    print_medians(summary)
    ratios = compute_ratios(summary, args.precisions)
    print_ratios(ratios)
    gflops = gflops_rows(summary, args.precisions)
    print_gflops(gflops)
    for note in notes:
        print(f"\nnote: {note}")
    return ratios, gflops


def peer_python(args: argparse.Namespace, notes: list[str]) -> Path | None:
    if args.no_peer:
        notes.append("peer left out (--no-peer)")
        return None
    if args.config != PEER_CONFIG:
        notes.append(f"peer left out: peer_diffusers.py is fixed at {PEER_CONFIG}, not {args.config}")
        return None
    if args.batch != PEER_BATCH:
        notes.append(f"peer left out: peer_diffusers.py is fixed at batch {PEER_BATCH}, not {args.batch}")
        return None
    if args.dry_run:
        return peer_env_dir() / "bin" / "python"
    return ensure_peer_env(notes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for script in ("seed_baseline.py", "peer_diffusers.py"):
        if not (args.shared / "bench" / script).is_file():
            sys.exit(f"bench_compare: {args.shared / 'bench' / script} not found (use --shared DIR)")
    notes: list[str] = []
    ddpm_env = resolve_ddpm_env(args.ddpm_env)
    peer_py = peer_python(args, notes)
    plan = plan_round(args, ddpm_env, peer_py)
    if args.dry_run:
        for run in plan:
            print(f"{label(run)}: {' '.join(run['cmd'])}")
        for note in notes:
            print(f"note: {note}")
        return 0
    started = datetime.now().isoformat(timespec="seconds")
    runs, round_seconds = run_rounds(args, plan)
    summary = summarize(runs)
    ratios, gflops = print_report(args, summary, notes)
    out = args.out or default_out()
    write_json(out, {"started": started, "finished": datetime.now().isoformat(timespec="seconds"),
                     "argv": sys.argv, "config": args.config, "batch": args.batch, "steps": args.steps,
                     "rounds": args.rounds, "precisions": args.precisions, "ddpm_env": str(ddpm_env),
                     "peer_python": str(peer_py) if peer_py else None, "round_seconds": round_seconds,
                     "notes": notes, "runs": runs, "summary": summary, "ratios": ratios, "gflops": gflops})
    print(f"\nraw results: {out}")
    return 0 if any("result" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
