"""The run directory: resolved config, checkpoints, portable EMA exports, previews, samples, metrics.

    RUN/config.yaml              the resolved config: all `ddpm sample` needs
    RUN/checkpoints/             tf.train.CheckpointManager: network, EMA, optimizer, counters, RNG
    RUN/exports/ema-STEP.npz     EMA weights keyed by 'layer/weight', readable on Keras 2 and 3
    RUN/previews/, RUN/samples/  PNG grids
    RUN/metrics.csv              one row per epoch
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from . import config as config_mod
from .images import atomic_write_bytes

EXPORT_RE = re.compile(r"^ema-(\d+)\.npz$")


class RunError(ValueError):
    """A run directory that cannot be used for what was asked (no config, no weights, ...)."""


class RunDir:
    """Paths and small I/O helpers of one run directory."""

    def __init__(self, path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.checkpoints = self.path / "checkpoints"
        self.exports = self.path / "exports"
        self.previews = self.path / "previews"
        self.samples = self.path / "samples"
        self.metrics_csv = self.path / "metrics.csv"

    def save_config(self, cfg) -> None:
        """Write the resolved config atomically."""
        header = "# Resolved configuration of this run (written by ddpm train). `ddpm sample` reads it.\n"
        atomic_write_bytes(self.config_path, (header + config_mod.dump_yaml(cfg)).encode("utf-8"))

    def load_config(self):
        """The run's saved config, validated like any config file."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path}: not a run directory (no config.yaml); train one with `ddpm train`")
        return config_mod.load_config(self.config_path)

    def export_paths(self) -> dict[int, Path]:
        """{step: path} of the EMA exports, any order."""
        if not self.exports.is_dir():
            return {}
        out = {}
        for p in self.exports.iterdir():
            m = EXPORT_RE.match(p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    def latest_export(self, step: int | None = None) -> tuple[int, Path]:
        """(step, path) of the newest EMA export, or of the one at `step`."""
        exports = self.export_paths()
        if not exports:
            raise RunError(f"{self.path}: this run has no exported weights yet (exports/ema-*.npz); "
                           "train it until the first checkpoint is written")
        if step is None:
            step = max(exports)
        elif step not in exports:
            raise RunError(f"{self.path}: no checkpoint at step {step}; available: "
                           + ", ".join(str(s) for s in sorted(exports)))
        return step, exports[step]

    def prune_exports(self, keep: int) -> None:
        """Delete all but the newest `keep` exports."""
        exports = self.export_paths()
        for step in sorted(exports)[:-keep]:
            exports[step].unlink(missing_ok=True)


def weights_dict(model) -> dict[str, np.ndarray]:
    """{'layer/weight': array} for every weight of a model, as float32."""
    from .compat import variable_key

    out = {}
    for v in model.weights:
        key = variable_key(v)
        assert key not in out, f"duplicate weight name {key}"
        out[key] = np.asarray(v.numpy(), dtype=np.float32)
    return out


def save_weights(model, path: Path, meta: dict) -> None:
    """Export a model's weights to an .npz we control (atomic), with a JSON-able `meta` entry."""
    buf = io.BytesIO()
    arrays = weights_dict(model)
    arrays["__meta__"] = np.frombuffer(yaml.safe_dump(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_weights(model, path: Path) -> dict:
    """Load an .npz export into `model`, checking every name and shape; returns its meta dict."""
    from .compat import variable_key

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable weights export ({exc})") from None
    meta = yaml.safe_load(arrays.pop("__meta__", np.zeros(0, np.uint8)).tobytes().decode("utf-8")) or {}
    for v in model.weights:
        key = variable_key(v)
        if key not in arrays:
            raise RunError(f"{path}: missing weight {key}: the export does not match this run's model config")
        if tuple(arrays[key].shape) != tuple(v.shape):
            raise RunError(f"{path}: weight {key} has shape {arrays[key].shape}, the model expects {tuple(v.shape)}")
        v.assign(arrays[key])
    return meta


def find_latest_run(root: Path) -> Path:
    """The run under `root` with the most recent export (or config, when none has exports)."""
    root = Path(root)
    candidates = [p.parent for p in root.glob("*/config.yaml")] if root.is_dir() else []
    if not candidates:
        raise RunError(f"no run found under {root}/ (a run is a folder with config.yaml); "
                       "train one with `ddpm train --config FILE` or pass --run DIR")

    def newest(run: Path) -> float:
        exports = RunDir(run).export_paths()
        files = list(exports.values()) or [run / "config.yaml"]
        return max(f.stat().st_mtime for f in files)

    return max(candidates, key=newest)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (POSIX and Windows)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)  # signal 0: existence check only (never used on Windows, where it would kill)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: RUN/.lock holds the owner's pid and host.

    Created with O_EXCL (atomic on every OS, no fcntl). A lock whose process is gone from this host
    is stale and taken over; a live one makes `acquire` raise RunError naming the owner.
    """

    def __init__(self, run: RunDir):
        self.path = run.path / ".lock"
        self.run = run
        self.held = False

    def _owner(self) -> dict:
        try:
            return yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return {}

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over."""
        self.run.path.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                pid, host = int(owner.get("pid", -1) or -1), owner.get("host")
                if host == socket.gethostname() and not pid_alive(pid):
                    self.path.unlink(missing_ok=True)
                    note = f"took over a stale lock of process {pid} (no longer running)"
                    continue
                raise RunError(
                    f"{self.run.path} is being trained by process {pid} on {host} (since {owner.get('since')}); "
                    f"wait for it or stop it. If that process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(yaml.safe_dump({"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            self.held = True
            return note
        raise RunError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def remove_partial_files(run: RunDir) -> list[Path]:
    """Delete what a killed process can leave behind: our `.NAME.tmp-PID` files and TF's `*_temp` checkpoint
    parts. (A checkpoint whose data was written but not yet listed in the manager's state is overwritten
    by the next save of the same step.) Returns what was removed."""
    removed = []
    for folder in (run.path, run.exports, run.previews, run.samples, run.checkpoints):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if ".tmp-" in p.name or "_temp" in p.name:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _last_metrics_row(run: RunDir) -> dict:
    if not run.metrics_csv.is_file():
        return {}
    with open(run.metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows[-1] if rows else {}


def describe_runs(root: Path) -> list[dict]:
    """One summary per run under `root`: step, epoch, last loss, newest checkpoint's time and size."""
    out = []
    for config in sorted(Path(root).glob("*/config.yaml")) if Path(root).is_dir() else []:
        run = RunDir(config.parent)
        exports = run.export_paths()
        step = max(exports) if exports else None
        newest = exports[step] if exports else None
        ckpt_bytes = sum(p.stat().st_size for p in run.checkpoints.glob(f"ckpt-{step}.*")) if step else 0
        row = _last_metrics_row(run)
        out.append({
            "run": str(run.path), "step": step, "epoch": row.get("epoch"), "loss": row.get("loss"),
            "checkpoint_time": time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.stat().st_mtime))
            if newest else None,
            "checkpoint_mb": round((ckpt_bytes + (newest.stat().st_size if newest else 0)) / 2**20, 1),
            "training": (run.path / ".lock").exists(),
        })
    return out
