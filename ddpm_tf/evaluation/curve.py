"""The memorisation curve of a long run: the in-training evaluations (`train.eval_every`) read back from
RUN/eval.csv, the step whose samples scored best, and RUN/eval/curve.png, KID and the near-copy share over the
steps, so a person sees when to stop (the export at the best step is kept, see `RunDir.prune_exports`).

TensorFlow-free: Pillow draws the plot.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from ..runs import read_csv


@dataclass(frozen=True)
class Point:
    """One in-training evaluation."""

    step: int
    kid: float
    kid_std: float
    near_copies: float  # share of samples that are near-copies of a training image, 0..1


def training_points(eval_csv: Path) -> list[Point]:
    """The in-training evaluations of eval.csv (rows with an epoch; `ddpm eval` rows have none), by step."""
    try:
        _, rows = read_csv(eval_csv)
    except (OSError, csv.Error):
        return []
    points = {}
    for row in rows:
        try:
            if row.get("epoch"):
                point = Point(int(row["step"]), float(row["kid_mean"]), float(row.get("kid_std") or 0.0),
                              float(row.get("near_copy_share") or 0.0))
                if math.isfinite(point.kid):  # a step evaluated again (a resumed run) counts once, the later row
                    points[point.step] = point
        except (KeyError, TypeError, ValueError):
            continue
    return [points[s] for s in sorted(points)]


def best(points: list[Point]) -> Point | None:
    """The evaluation with the lowest KID (the earliest of equals)."""
    return min(points, key=lambda p: (p.kid, p.step), default=None)


def summary(points: list[Point]) -> str:
    """One line for the log: the best step so far, and where near-copies first appeared."""
    top = best(points)
    if top is None:
        return ""
    text = f"lowest KID so far at step {top.step} ({top.kid:.4f})"
    copying = next((p for p in points if p.near_copies > 0), None)
    if copying is not None:
        text += f"; near-copies since step {copying.step}"
    return text


def draw(points: list[Point], path: Path, width: int = 640, panel: int = 200) -> None:
    """Two panels over the steps, KID (with +- std) above and the near-copy share (%) below, the best step
    marked; written atomically."""
    from PIL import Image, ImageDraw

    from ..images import atomic_write_bytes

    margin_l, margin_r, margin_t, gap = 64, 16, 24, 36
    height = margin_t + 2 * panel + gap + 28
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    steps = [p.step for p in points] or [0]
    lo, hi = min(steps), max(max(steps), min(steps) + 1)

    def x_of(step):
        return margin_l + (step - lo) / (hi - lo) * (width - margin_l - margin_r)

    top = best(points)
    series = (("KID", [p.kid for p in points], [p.kid_std for p in points], (31, 119, 180)),
              ("near-copies %", [100 * p.near_copies for p in points], None, (214, 39, 40)))
    for i, (name, values, stds, colour) in enumerate(series):
        y0 = margin_t + i * (panel + gap)
        upper = max([v + (s if stds else 0) for v, s in zip(values, stds or [0] * len(values))] or [1.0])
        upper = upper if upper > 0 else 1.0

        def y_of(v, y0=y0, upper=upper):
            return y0 + panel - max(0.0, min(v, upper)) / upper * panel

        d.rectangle([margin_l, y0, width - margin_r, y0 + panel], outline=(160, 160, 160))
        d.text((4, y0), name, fill=colour)
        d.text((4, y0 + 14), f"{upper:.3g}", fill=(90, 90, 90))
        d.text((4, y0 + panel - 12), "0", fill=(90, 90, 90))
        if top is not None:
            d.line([x_of(top.step), y0, x_of(top.step), y0 + panel], fill=(44, 160, 44))
        if stds:
            for p, v, s in zip(points, values, stds):
                d.line([x_of(p.step), y_of(v - s), x_of(p.step), y_of(v + s)], fill=(174, 199, 232), width=3)
        xy = [(x_of(p.step), y_of(v)) for p, v in zip(points, values)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    base = margin_t + 2 * panel + gap
    d.text((margin_l, base + 4), f"step {lo}", fill=(90, 90, 90))
    d.text((width - margin_r - 80, base + 4), f"step {hi}", fill=(90, 90, 90))
    if top is not None:
        d.text((margin_l + 140, base + 4), f"best KID at step {top.step} (green)", fill=(44, 160, 44))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
