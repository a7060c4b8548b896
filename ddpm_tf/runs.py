"""The run directory: every file a run has, which of them this tool wrote, the lock, the portable exports.

    RUN/.ddpm_tf_run             the marker that says "a run of ddpm_tf" (written when the run is created)
    RUN/config.yaml              the resolved config: all `ddpm sample` needs
    RUN/labels.json              a run with labels: its classes or tag vocabulary (also in every export)
    RUN/checkpoints/             tf.train.CheckpointManager: network, EMA, optimizer, counters, RNG
    RUN/checkpoints/written_by.yaml  the TensorFlow and Keras versions that wrote them
    RUN/exports/ema-STEP.npz     EMA weights keyed by 'layer/weight', readable on Keras 2 and 3
    RUN/previews/                preview grids during training
    RUN/metrics.csv, RUN/eval.csv, RUN/eval/, RUN/tensorboard/   logs and evaluations
    RUN/samples/                 what `ddpm sample`, `interpolate` and `img2img` write by default
    RUN/.lock                    the pid and host of the trainer
    RUN/progress.json            the trainer's step, total, loss and ETA, rewritten every few seconds (the web page)

Cleanup is by exact name: `--restart` and the sweep of interrupted writes remove only files whose names
this tool writes (the patterns below), inside folders that are provably runs, and never `samples/`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml

from . import config as config_mod
from .errors import RunError
from .images import atomic_write_bytes
from .outputs import NUMBERED_RE

MARKER_NAME = ".ddpm_tf_run"
CONFIG_HEADER = "# Resolved configuration of this run (written by ddpm train)."
EXPORT_RE = re.compile(r"^ema-(\d+)\.npz$")
# A killed atomic write (images.atomic_write_bytes) leaves `.NAME.tmp-PID`; TensorFlow's checkpoint writer
# leaves `ckpt-N_temp/part-...` folders and `checkpoint.tmpHEX` state files.
_ATOMIC_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_TF_TEMP_DIR_RE = re.compile(r"^ckpt-\d+_temp$")
_TF_TEMP_PART_RE = re.compile(r"^part-\d+-of-\d+(\.index|\.data-\d+-of-\d+)$")
_TF_STATE_TMP_RE = re.compile(r"^checkpoint\.tmp[0-9a-f]{32}$")


def export_name(step: int) -> str:
    """The file name of the EMA export of `step` (parsed back by EXPORT_RE)."""
    return f"ema-{step:08d}.npz"


class RunDir:
    """Every path of one run directory, which of its files this tool wrote, and small I/O helpers."""

    def __init__(self, path):
        self.path = Path(path)
        self.marker = self.path / MARKER_NAME
        self.config_path = self.path / "config.yaml"
        self.labels_path = self.path / "labels.json"
        self.lock_path = self.path / ".lock"
        self.progress_path = self.path / "progress.json"
        self.checkpoints = self.path / "checkpoints"
        self.written_by = self.checkpoints / "written_by.yaml"
        self.exports = self.path / "exports"
        self.previews = self.path / "previews"
        self.samples = self.path / "samples"
        self.metrics_csv = self.path / "metrics.csv"
        self.eval_csv = self.path / "eval.csv"
        self.eval_dir = self.path / "eval"
        self.eval_curve = self.eval_dir / "curve.png"
        self.tensorboard = self.path / "tensorboard"

    # --- what is this tool's -----------------------------------------------------------------------
    def owned_names(self) -> dict[Path, re.Pattern]:
        """{folder: pattern of the file names this tool writes there}; `samples/` is the user's and absent."""
        return {
            self.path: re.compile(r"^(config\.yaml|labels\.json|progress\.json|(metrics|eval)\.csv(\.damaged)?)$"),
            self.checkpoints: re.compile(r"^(checkpoint|written_by\.yaml|ckpt-\d+\.(index|data-\d+-of-\d+))$"),
            self.exports: EXPORT_RE,
            self.previews: re.compile(r"^(latest\.png|preview-epoch\d+-step\d+\.png)$"),
            self.eval_dir: re.compile(r"^(samples|closest-pairs)-.+\.png$|^memorization-.+\.csv$|^curve\.png$"),
            self.tensorboard: re.compile(r"^events\.out\.tfevents\..+"),
        }

    def is_run(self) -> bool:
        """Whether this folder is provably a run of this tool: its marker, or (runs made before the marker
        existed) a config.yaml that `ddpm train` wrote."""
        if self.marker.is_file():
            return True
        try:
            with open(self.config_path, encoding="utf-8", errors="replace") as f:
                return f.readline().startswith(CONFIG_HEADER)
        except OSError:
            return False

    def claim(self) -> None:
        """Make this folder a run (creating it), or check that it is one; a folder holding anything else is
        refused untouched, so a run never writes among a person's files."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"run.dir {self.path} is a file, not a folder; set run.dir to a new folder")
        if self.is_run():
            if not self.marker.exists():
                self._write_marker()
            return
        foreign = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunError(f"run.dir {self.path} is a folder that is not a ddpm_tf run and is not empty "
                           f"({shown}); set run.dir to a new or empty folder, e.g. runs/NAME")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_marker()
        except OSError as exc:
            raise RunError(f"run.dir {self.path}: cannot create the run there ({exc.strerror or exc}); "
                           "set run.dir to a writable folder") from None

    def _write_marker(self) -> None:
        from . import __version__

        atomic_write_bytes(self.marker, yaml.safe_dump({
            "ddpm_tf": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}).encode("utf-8"))

    def remove_written(self) -> list[Path]:
        """Delete every file this tool wrote into the run (for `--restart`), keeping `samples/`, the marker,
        the lock and anything else; folders left empty are removed. Returns what was deleted."""
        if not self.is_run():
            raise RunError(f"{self.path} is not a ddpm_tf run (no {MARKER_NAME} and no config.yaml written by "
                           "ddpm train): --restart deletes nothing there; set run.dir to the run to start over")
        removed = self.remove_partial_files()
        for folder, pattern in self.owned_names().items():
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if pattern.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
            if folder != self.path and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def remove_partial_files(self) -> list[Path]:
        """Delete what a killed write of this tool left behind, by exact name, in a run's folders: atomic-write
        temporaries of our names whose writer process is gone (a `ddpm sample` may be writing now), and
        TensorFlow's checkpoint temporaries (call this under the run's lock). Nothing outside a run."""
        if not self.is_run():
            return []
        removed = []
        owned = self.owned_names()
        for folder in [*owned, self.samples, *self._sample_folders()]:
            if not folder.is_dir() or folder.is_symlink():
                continue
            for p in folder.iterdir():
                m = _ATOMIC_TMP_RE.match(p.name)
                if m and p.is_file() and not p.is_symlink() and self._is_our_name(folder, m["name"], owned) \
                        and not pid_alive(int(m["pid"])):
                    p.unlink()
                    removed.append(p)
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                if _TF_STATE_TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink()
                    removed.append(p)
                elif _TF_TEMP_DIR_RE.match(p.name) and p.is_dir() and not p.is_symlink():
                    for q in p.iterdir():
                        if _TF_TEMP_PART_RE.match(q.name) and q.is_file() and not q.is_symlink():
                            q.unlink()
                            removed.append(q)
                    if not any(p.iterdir()):
                        p.rmdir()
                        removed.append(p)
        return removed

    def _sample_folders(self) -> list[Path]:
        """The per-image folders beside default sample grids (samples/NNNNN-grid-.../)."""
        if not self.samples.is_dir() or self.samples.is_symlink():
            return []
        return [p for p in self.samples.iterdir() if p.is_dir() and NUMBERED_RE.match(p.name)]

    def _is_our_name(self, folder: Path, name: str, owned: dict) -> bool:
        if folder in owned:
            return bool(owned[folder].match(name)) or (folder == self.path and name in (MARKER_NAME, ".lock"))
        return name.endswith((".png", ".gif"))  # samples/ and its per-image folders hold our PNGs and GIFs

    # --- config and exports ------------------------------------------------------------------------
    def save_config(self, cfg) -> None:
        """Write the resolved config atomically."""
        header = CONFIG_HEADER + " `ddpm sample` reads it.\n"
        atomic_write_bytes(self.config_path, (header + config_mod.dump_yaml(cfg)).encode("utf-8"))

    def load_config(self):
        """The run's saved config, validated like any config file."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path}: not a run directory (no config.yaml); train one with `ddpm train`")
        return config_mod.load_config(self.config_path)

    def save_labels(self, label_set) -> None:
        """Write the run's label set (None: a run without labels, which has no labels.json)."""
        if label_set is None:
            self.labels_path.unlink(missing_ok=True)
            return
        atomic_write_bytes(self.labels_path, json.dumps(label_set.to_dict(), indent=1).encode("utf-8"))

    def load_labels(self):
        """The run's LabelSet, or None for a run without labels."""
        from .data.labels import LabelSet
        from .errors import LabelError

        if not self.labels_path.is_file():
            return None
        try:
            return LabelSet.from_dict(json.loads(self.labels_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, LabelError) as exc:
            raise RunError(f"{self.labels_path}: damaged ({type(exc).__name__}: {str(exc)[:120]}); it holds the "
                           "run's classes or tags, which every export also records") from None

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

    def export_path(self, step: int) -> Path:
        return self.exports / export_name(step)

    def checkpoint_prefixes(self) -> dict[int, str]:
        """{step: prefix} of the checkpoints whose index file is on disk (`ckpt-N.index`), whatever the
        manager's state file says."""
        out = {}
        for p in self.checkpoints.glob("ckpt-*.index"):
            number = p.stem.rsplit("-", 1)[1]
            if number.isdigit():
                out[int(number)] = str(p.with_suffix(""))
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

    def prune_exports(self, keep: int, also=()) -> None:
        """Delete all but the newest `keep` exports and those at the steps `also` (the best evaluated one)."""
        exports = self.export_paths()
        for step in sorted(exports)[:-keep]:
            if step not in also:
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


def read_export(path: Path, weights: bool = True) -> tuple[dict, dict]:
    """(arrays, meta) of an .npz export (arrays empty unless `weights`); RunError when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if weights or k == "__meta__"}
        meta = yaml.safe_load(arrays.pop("__meta__", np.zeros(0, np.uint8)).tobytes().decode("utf-8")) or {}
    # A truncated or damaged .npz fails in the zip reader, in zlib or in the array header.
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, yaml.YAMLError) as exc:
        raise RunError(f"{path}: not a readable weights export, truncated or damaged "
                       f"({type(exc).__name__}: {str(exc)[:120]})") from None
    return arrays, meta


def export_labels(path: Path):
    """The LabelSet an export records (None: a network without labels), read without loading the weights."""
    from .data.labels import LabelSet
    from .errors import LabelError

    _, meta = read_export(path, weights=False)
    if not meta.get("labels"):
        return None
    try:
        return LabelSet.from_dict(meta["labels"])
    except LabelError as exc:
        raise RunError(f"{path}: its labels are damaged ({exc})") from None


def load_weights(model, path: Path) -> dict:
    """Load an .npz export into `model`, checking every name and shape; returns its meta dict."""
    from .compat import variable_key

    arrays, meta = read_export(path)
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


def load_run(run_dir: Path | None, runs_root: Path, checkpoint: int | None = None):
    """(RunDir, config, EMA network, step, label set or None) of a run; the newest run under `runs_root` by
    default.

    The network is built in the precision the run trained in, with the labels its export records (a run
    with labels: its classes or tags), and the weights exported at `checkpoint` (the newest by default)."""
    from .data.augment import network_dim
    from .precision import apply_policy
    from .unet import build_unet

    run = RunDir(run_dir if run_dir is not None else find_latest_run(runs_root))
    cfg = run.load_config()
    step, export = run.latest_export(checkpoint)
    apply_policy(cfg.train.precision)
    try:
        label_set = export_labels(export)
        net = build_unet(cfg.model, cfg.data.image_size, cfg.data.channels, name="ema_unet",
                         num_labels=len(label_set) if label_set else 0,
                         augment_dim=network_dim(cfg.train.augment_p))
        load_weights(net, export)
    except RunError as exc:
        others = sorted(s for s in run.export_paths() if s != step)
        hint = f"; this run's other exports: --checkpoint {', '.join(map(str, others))}" if others else ""
        raise RunError(f"{exc}{hint}") from None
    return run, cfg, net, step, label_set


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
    """An exclusive lock on a run directory: RUN/.lock holds the owner's pid, host and start time.

    Published whole with a hard link (atomic, no fcntl: works on Windows too), so a lock file is never seen
    half-written. A lock whose process is gone from this host, or that is empty or unreadable (a crash of an
    older version, a damaged disk), is taken over with a note; a live one makes `acquire` raise RunError.
    """

    def __init__(self, run: RunDir):
        self.path = run.lock_path
        self.run = run
        self.held = False

    def owner(self) -> dict | None:
        """The lock's {pid, host, since}; None when there is no lock, {} when it is empty or unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            owner = yaml.safe_load(text)
        except yaml.YAMLError:
            return {}
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            return {}
        return owner

    def busy_message(self, owner: dict) -> str:
        """Why another trainer cannot start while `owner` holds the lock (for `ddpm train` and the web page)."""
        return (f"{self.run.path} is being trained by process {owner['pid']} on {owner.get('host')} (since "
                f"{owner.get('since')}); wait for it or stop it. If that process is gone, delete {self.path}")

    def live_owner(self) -> dict | None:
        """The owner when a process holds the lock now: alive on this host, or on another host (unknowable)."""
        owner = self.owner()
        return owner if _holds(owner) else None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale or damaged lock was taken over."""
        body = yaml.safe_dump({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode("utf-8")
        note = None
        for _ in range(3):
            try:
                atomic_write_bytes(self.path, body, overwrite=False)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile
                if _holds(owner):
                    raise RunError(self.busy_message(owner)) from None
                self.path.unlink(missing_ok=True)
                note = (f"took over a stale lock of process {owner['pid']} (no longer running)" if owner else
                        f"took over an empty or unreadable lock file {self.path} (no trainer wrote it whole)")
                continue
            except OSError as exc:
                raise RunError(f"{self.run.path}: cannot write the run's lock ({exc.strerror or exc}); "
                               "is the folder read-only? Set run.dir to a writable folder") from None
            self.held = True
            return note
        raise RunError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _holds(owner: dict | None) -> bool:
    """Whether a lock's owner still runs: alive on this host, or on another host (which cannot be asked)."""
    return bool(owner) and not (owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"]))


def _csv_value(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


def write_csv(path: Path, fields: list, rows: list[dict]) -> None:
    """Write a CSV whole and rename it into place: a crash never leaves a half row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def read_csv(path: Path) -> tuple[list, list[dict]]:
    """(header, rows) of a CSV this tool wrote; ([], []) when missing. A damaged file raises csv.Error."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        return [], []


def append_csv_row(path: Path, row: dict) -> None:
    """The one write policy of metrics.csv and eval.csv: add a row, columns in first-seen order (a row with
    new keys widens the header), the file rewritten whole and renamed into place (these files stay small).
    A file too damaged to read is kept beside as NAME.damaged and a new one started."""
    path = Path(path)
    try:
        fields, rows = read_csv(path)
    except csv.Error:
        os.replace(path, path.with_name(path.name + ".damaged"))
        fields, rows = [], []
    fields += [key for key in row if key not in fields]
    write_csv(path, fields, [*rows, row])


def _last_metrics_row(run: RunDir) -> dict:
    """The last row of metrics.csv; {} when it is missing, empty or unreadable (the listing goes on)."""
    try:
        rows = read_csv(run.metrics_csv)[1]
    except (OSError, csv.Error):
        return {}
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
        live = RunLock(run).live_owner()
        out.append({
            "run": str(run.path), "step": step, "epoch": row.get("epoch"), "loss": row.get("loss"),
            "checkpoint_time": time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.stat().st_mtime))
            if newest else None,
            "checkpoint_mb": round((ckpt_bytes + (newest.stat().st_size if newest else 0)) / 2**20, 1),
            "training": live is not None,
            "trainer": f"pid {live['pid']} on {live.get('host')}" if live else None,
        })
    return out
