"""What a sampling request asks for on a run with labels: `--class` and `--tags` -> conditions (label rows,
names for files and PNG metadata), checked against the run's label set. The one home of those checks, for
`ddpm sample`, img2img, interpolate, eval and the web page. TF-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .data.labels import LabelSet, natural_key, parse_tags
from .errors import LabelError

ALL = "all"  # --class all: one grid row per class
NO_LABELS = ("this run has no labels (it was trained with data.labels: none), so {what} cannot be used: train a "
             "run with data.labels: folders (one subfolder per class) or tags (a caption .txt beside each image)")


@dataclass(frozen=True)
class Condition:
    """One thing to draw: a class, or a set of tags, as a (K,) multi-hot row of the run's label set."""

    kind: str  # "class" or "tags"
    names: tuple[str, ...]
    vector: np.ndarray

    @property
    def text(self) -> str:
        return ", ".join(self.names)

    def metadata(self) -> dict:
        """PNG text metadata, read back by `--class` / `--tags` to regenerate an image exactly."""
        return {f"ddpm_tf:{self.kind}": self.text}

    @property
    def slug(self) -> str:
        """A file-name-safe form: 's7', 'smile+glasses'."""
        return "+".join(re.sub(r"[^\w.-]+", "_", n).strip("_") or "x" for n in self.names)[:60]


def requested(label_set: LabelSet | None, classes=(), tags=(), guidance: float | None = None) -> list[Condition]:
    """The conditions of a request, in order (empty: unconditional). `classes` are class names or `all`,
    `tags` comma-separated tag lists, one condition each. LabelError (one line, exit 2) for a class or tag the
    run does not have, an empty tag list, the wrong kind of label, or labels asked of a run without any."""
    classes, tags = list(classes or ()), list(tags or ())
    if label_set is None:
        asked = [flag for flag, given in (("--class", classes), ("--tags", tags), ("--guidance", guidance is not None))
                 if given]
        if asked:
            raise LabelError(NO_LABELS.format(what=" and ".join(asked)))
        return []
    if guidance is not None and guidance < 0:
        raise LabelError(f"--guidance {guidance:g}: expected a scale >= 0 (0 unconditional, 1 conditional)")
    if label_set.mode == "folders" and tags:
        raise LabelError(f"--tags: this run's labels are classes (data.labels: folders, {len(label_set)} of them): "
                         "use --class NAME or --class all")
    if label_set.mode == "tags" and classes:
        raise LabelError(f"--class: this run's labels are tags (data.labels: tags, {len(label_set)} of them): "
                         'use --tags "tag one, tag two"')
    conditions = []
    for name in classes:
        names = sorted(label_set.names, key=natural_key) if name == ALL else [label_set.resolve(name)]
        conditions += [Condition("class", (n,), label_set.vector([n])) for n in names]
    for text in tags:
        names = tuple(label_set.resolve(t) for t in parse_tags(text))
        conditions.append(Condition("tags", names, label_set.vector(list(names))))  # none: LabelError
    return conditions

