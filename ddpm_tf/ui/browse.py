"""What the Runs tab shows of the runs under the runs folder: the table of `ddpm runs` (newest first), and for
one run its checkpoints, loss and learning-rate curves (metrics.csv), previews (previews/), evaluations and
KID over steps (eval.csv) and resolved config. Reads files only; TF-free."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from ..runs import RunDir, describe_runs, read_csv

RUN_COLUMNS = ("run", "step", "epoch", "loss", "checkpoint", "training")
_PREVIEW_RE = re.compile(r"^preview-epoch(\d+)-step(\d+)\.png$")


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def list_runs(runs_root: Path) -> list[dict]:
    """`ddpm runs`' rows, the newest checkpoint first (runs without one last), with the run's folder name."""
    rows = describe_runs(runs_root)
    for row in rows:
        row["name"] = Path(row["run"]).name
    return sorted(rows, key=lambda r: (r["checkpoint_time"] or "", r["name"]), reverse=True)


def runs_table(runs_root: Path) -> list[list]:
    """The rows of the Runs tab's table, in RUN_COLUMNS order."""
    return [[r["name"], r["step"] or "-", r["epoch"] or "-", r["loss"] or "-", r["checkpoint_time"] or "-",
             f"training ({r['trainer']})" if r["training"] else ""] for r in list_runs(runs_root)]


def checkpoints(run_path: Path) -> list[int]:
    """The steps with an EMA export, newest first."""
    return sorted(RunDir(run_path).export_paths(), reverse=True)


def _rows(path: Path) -> list[dict]:
    try:
        return read_csv(path)[1]
    except (OSError, csv.Error):
        return []


def metrics_curves(run_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{'loss': [(step, value)], 'learning_rate': [...]} from metrics.csv (unreadable values left out)."""
    curves = {"loss": [], "learning_rate": []}
    for row in _rows(RunDir(run_path).metrics_csv):
        step = _number(row.get("step"))
        for key, points in curves.items():
            value = _number(row.get(key))
            if step is not None and value is not None:
                points.append((int(step), value))
    return curves


def eval_table(run_path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of eval.csv, as written."""
    try:
        header, rows = read_csv(RunDir(run_path).eval_csv)
    except (OSError, csv.Error):
        return [], []
    return header, [[row.get(k) or "" for k in header] for row in rows]


def kid_curve(run_path: Path) -> list[tuple[int, float]]:
    """(step, KID) of every evaluation in eval.csv, by step."""
    points = [(int(s), k) for row in _rows(RunDir(run_path).eval_csv)
              if (s := _number(row.get("step"))) is not None and (k := _number(row.get("kid_mean"))) is not None]
    return sorted(points)


def previews(run_path: Path) -> list[tuple[int, Path]]:
    """(step, path) of every preview grid of the run, by step: the history that shows faces forming."""
    folder = RunDir(run_path).previews
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _PREVIEW_RE.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_preview(run_path: Path) -> Path | None:
    path = RunDir(run_path).previews / "latest.png"
    return path if path.is_file() else None


def config_text(run_path: Path) -> str:
    """The run's resolved config.yaml, as written."""
    try:
        return RunDir(run_path).config_path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"# cannot read the config: {exc.strerror or exc}"
