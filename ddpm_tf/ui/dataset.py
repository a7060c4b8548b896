"""What the Data tab does: `ddpm prepare` on the data section of a config (or a run's saved config),
optionally on another folder inside the page's roots, and its report in pieces the page shows: counts per
reason, the skipped files with their reasons, thumbnails of used images, the class or tag balance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data import labels as labels_mod
from ..data.decode import shown
from ..data.prepare import REASON_ORDER, prepare, summary
from .roots import Roots

THUMBNAILS = 24


@dataclass
class Report:
    """The Data tab's view of one prepare run."""

    summary: str
    counts: list[list] = field(default_factory=list)  # [reason, files]
    skipped: list[list] = field(default_factory=list)  # [file, reason, detail]
    thumbnails: list[np.ndarray] = field(default_factory=list)  # (S, S, C) uint8
    balance: str = ""


def data_sources(roots: Roots) -> list[str]:
    """The configs whose data section the tab can prepare: the configs folder's, then each run's saved one."""
    return [p.name for p in roots.config_files()] + [f"run: {p.parent.name}" for p in roots.run_configs()]


def _config_path(roots: Roots, source: str):
    if source.startswith("run: "):
        return roots.check(roots.runs / source[len("run: "):] / "config.yaml", "config")
    path = roots.check(roots.configs / source, "config")
    if path.parent != roots.configs:
        from ..errors import PathError

        raise PathError(f"config {source}: choose a config of {roots.configs}")
    return path


def prepare_report(roots: Roots, source: str, folder: str = "", echo=lambda msg: None) -> Report:
    """Prepare the data of `source` (a name of data_sources), or of `folder` with that config's settings;
    a folder with nothing usable gives a report of what was skipped and why."""
    from ..config import load_config
    from ..errors import DataError

    sets = [f"data.dir={roots.check(folder, 'folder')}"] if (folder or "").strip() else []
    cfg = load_config(_config_path(roots, source), sets)
    lines = []
    try:
        result = prepare(cfg.data, echo=lines.append)
    except DataError as exc:  # nothing usable: prepare's summary says what happened to each file
        return Report("\n".join([*lines, f"error: {exc}"]))
    reasons = result.reasons()
    counts = [[reason, reasons[reason]] for reason in sorted(reasons, key=lambda r: (REASON_ORDER + (r,)).index(r))]
    skipped = [[shown(r.path), r.reason, shown(r.detail)] for r in result.files if r.reason is not None]
    images = result.images(memory_mb=0)  # memory-mapped: only the thumbnails are read
    thumbs = list(images.take(np.arange(min(THUMBNAILS, len(images)))))
    balance = "\n".join(labels_mod.report(result.label_info)) if result.label_info is not None else \
        "no labels (data.labels: none)"
    return Report(summary(result), counts, skipped, thumbs, balance)
