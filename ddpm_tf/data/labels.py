"""Labels from the data: each image's class (its first-level folder) or its tags (a caption file beside it).

`data.labels`:
- `folders`: `data.dir/CLASS/.../image.png` has class CLASS (deeper folders belong to their first-level
  folder); images directly in data.dir are unlabelled and train only the unconditional branch. The classes
  are the first-level folders with at least one used image, in plain `sorted()` order of their names: that
  order is the class index, the same on every machine and in every locale. The balance table shows them in
  natural order (s1, s2, ..., s10) for reading only.
- `tags`: `img001.png` + `img001.txt`, comma-separated tags (the convention of Stable Diffusion fine-tuning
  sets: kohya_ss, webui), normalised by `normalise_tag`. The vocabulary is the tags on at least
  data.min_tag_count used images, most frequent first, then by name; rarer tags are reported and not
  conditioned on. An image with no caption, or with rare tags only, is unlabelled.

Labels are computed at every `ddpm prepare` (folder names and small text files: no pixel is decoded for
them) and stored in the cache index, so a changed caption or a moved image is an ordinary incremental
change. TF-free.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import LabelError  # defined with the other user errors; imported from here too
from .decode import IMAGE_SUFFIXES, NOT_AN_IMAGE, NotRegularFile, open_regular, shown

LABEL_MODES = ("none", "folders", "tags")
CAPTION = "caption"  # a caption file's reason in the manifest (tags mode): read, but not an image to train on
CAPTION_SUFFIX = ".txt"
CAPTION_MAX_BYTES = 2**20  # a caption is a line of tags: a bigger .txt is something else
CLOSEST = 8  # names in an unknown-label message, closest first
TABLE_ROWS = 28  # rows of the balance table before "(+K more)": with the rest, one screen
TABLE_COLUMNS = 10  # s1 ... s10 on the first row
NAME_WIDTH = 32  # longer names are cut in the table
WARNINGS = 4  # warnings of one kind before "(+K more)"
WIDTH = 110


def normalise_tag(text: str) -> str:
    """One tag as compared and stored: lower case, `_` as a space, whitespace collapsed and stripped."""
    return " ".join(text.replace("_", " ").lower().split())


def parse_tags(text: str) -> list[str]:
    """Comma-separated tags -> the normalised tags in their first order, without empty ones or repeats."""
    return list(dict.fromkeys(t for t in map(normalise_tag, text.split(",")) if t))


def natural_key(name: str) -> tuple:
    """A sort key putting s2 before s10, for display only (the class order is plain `sorted()`)."""
    return tuple(int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)), name


def _listing(names, limit: int = CLOSEST) -> str:
    """'a, b, c, ... (40)': the first `limit` names and how many there are."""
    names = list(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + f" ({len(names)})"


@dataclass(frozen=True)
class LabelSet:
    """The classes (mode `folders`: sorted folder names) or the tag vocabulary (mode `tags`): name k is column
    k of every label vector."""

    mode: str  # "folders" or "tags"
    names: tuple[str, ...]

    def __post_init__(self):
        if self.mode not in LABEL_MODES[1:]:
            raise LabelError(f"label set: mode {self.mode!r} is not one of {', '.join(LABEL_MODES[1:])}")
        if isinstance(self.names, str) or not all(isinstance(n, str) and n for n in self.names):
            raise LabelError(f"label set: names must be a list of non-empty strings, got {self.names!r:.80}")
        object.__setattr__(self, "names", tuple(self.names))
        if len(set(self.names)) != len(self.names):
            twice = sorted(n for n, k in Counter(self.names).items() if k > 1)
            raise LabelError(f"label set: names repeat ({_listing(twice)})")

    @functools.cached_property
    def _columns(self) -> dict[str, int]:
        return {n: k for k, n in enumerate(self.names)}

    @property
    def kind(self) -> str:
        """'class' or 'tag', for messages."""
        return "class" if self.mode == "folders" else "tag"

    def __len__(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """{"mode": ..., "names": [...]}: plain JSON and YAML types."""
        return {"mode": self.mode, "names": list(self.names)}

    @classmethod
    def from_dict(cls, d) -> LabelSet:
        """The inverse of `to_dict`; LabelError naming what is wrong with `d`."""
        if not isinstance(d, dict) or not isinstance(d.get("names"), list):
            raise LabelError(f"label set: expected {{mode: folders or tags, names: [...]}}, got {d!r:.80}")
        return cls(d.get("mode"), tuple(d["names"]))

    def _known(self) -> str:
        return f"known {'classes' if self.mode == 'folders' else 'tags'} are"

    def resolve(self, name: str) -> str:
        """`name` as it is in the set: exactly, or (tags) once normalised; LabelError naming the known ones,
        closest first, otherwise."""
        if name in self._columns:
            return name
        key = normalise_tag(name) if self.mode == "tags" else name
        if key in self._columns:
            return key
        if not self.names:
            raise LabelError(f"unknown {self.kind} {name!r}: this label set has no {self.kind} at all")

        def closeness(n: str) -> tuple:
            return -difflib.SequenceMatcher(None, key, n).ratio(), natural_key(n)

        closest_first = sorted(self.names, key=closeness)
        raise LabelError(f"unknown {self.kind} {name!r}: {self._known()} {_listing(closest_first)}")

    def vector(self, names: list[str]) -> np.ndarray:
        """(K,) float32 multi-hot of `names` (each resolved); LabelError for an unknown name or for none."""
        if isinstance(names, str):
            names = [names]
        if not names:
            if self.mode == "tags":
                raise LabelError('--tags: no tag given: expected comma-separated tags, e.g. --tags "smile, glasses"; '
                                 f"{self._known()} {_listing(self.names)}")
            in_order = sorted(self.names, key=natural_key)
            raise LabelError(f"--class: no class given: {self._known()} {_listing(in_order)}")
        v = np.zeros(len(self.names), np.float32)
        for name in names:
            v[self._columns[self.resolve(name)]] = 1.0
        return v


@dataclass
class Labels:
    """The labels of a training set: one multi-hot row per image, in the cache's row order."""

    label_set: LabelSet
    matrix: np.ndarray  # (N, K) uint8 multi-hot per training row; all-zero = unlabelled

    def counts(self) -> dict[str, int]:
        """Images per class or tag, in the label set's order."""
        totals = self.matrix.sum(axis=0, dtype=np.int64)
        return {name: int(k) for name, k in zip(self.label_set.names, totals)}

    def unlabelled(self) -> int:
        """Images with no class or no vocabulary tag: they train only the unconditional branch."""
        return int(np.count_nonzero(~self.matrix.any(axis=1)))

    def to_index(self) -> dict:
        """The form stored in cache.json: the label set and, per row, its columns."""
        rows, cols = np.nonzero(self.matrix)
        per_row = np.split(cols, np.searchsorted(rows, np.arange(1, len(self.matrix))))
        return {**self.label_set.to_dict(), "rows": [c.tolist() for c in per_row] if len(self.matrix) else []}

    @classmethod
    def from_index(cls, d: dict, count: int) -> Labels:
        """The inverse of `to_index` for a cache of `count` rows; ValueError (LabelError) if it does not fit."""
        label_set = LabelSet.from_dict(d)
        rows = d["rows"]
        if not isinstance(rows, list) or len(rows) != count:
            raise LabelError(f"labels: {len(rows) if isinstance(rows, list) else rows!r:.40} rows for {count} images")
        matrix = np.zeros((count, len(label_set)), np.uint8)
        for i, cols in enumerate(rows):
            if not isinstance(cols, list) or not all(type(c) is int and 0 <= c < len(label_set) for c in cols):
                raise LabelError(f"labels: row {i} has columns {cols!r:.40}, expected integers below {len(label_set)}")
            matrix[i, cols] = 1
        return cls(label_set, matrix)


def mark_captions(records) -> None:
    """Tags mode: a `.txt` beside an image, with its stem, is that image's caption (reason CAPTION, detail
    'tags of IMAGE') instead of not-an-image. `records` are prepare's FileRecords in path order."""
    images: dict[str, list[str]] = {}
    for r in records:
        stem, suffix = os.path.splitext(r.path)
        if suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(stem, []).append(r.path.rsplit("/", 1)[-1])
    for r in records:
        stem, suffix = os.path.splitext(r.path)
        if suffix.lower() == CAPTION_SUFFIX and r.reason == NOT_AN_IMAGE and stem in images:
            r.reason, r.detail = CAPTION, "tags of " + ", ".join(shown(n) for n in images.pop(stem))


def read_caption(path) -> tuple[list[str], str | None]:
    """(tags, None) from one caption file (UTF-8, a BOM allowed), or ([], why it is read as no tags)."""
    try:
        with open_regular(path) as f:
            data = f.read(CAPTION_MAX_BYTES + 1)
    except NotRegularFile:
        return [], "is not a regular file"
    except OSError as exc:
        return [], f"cannot be read ({exc.strerror or type(exc).__name__})"
    if len(data) > CAPTION_MAX_BYTES:
        return [], f"is larger than {CAPTION_MAX_BYTES // 2**20} MB"
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], f"is not UTF-8 text (byte 0x{data[bom + exc.start]:02x} at offset {bom + exc.start})"
    return parse_tags(text), None


@dataclass
class Found:
    """What prepare learnt about the labels of this run's training rows."""

    labels: Labels
    values: dict[str, object]  # per used path: its class (or None) or its tags (rare ones too), for the manifest
    min_class_images: int
    min_tag_count: int = 0
    rare: dict[str, int] = field(default_factory=dict)  # tags below data.min_tag_count, most frequent first
    warnings: list[str] = field(default_factory=list)
    problem: str | None = None  # a DataError message: the labels cannot be used

    @property
    def key(self) -> str:
        """The manifest key of each row's labels."""
        return "label" if self.labels.label_set.mode == "folders" else "tags"

    def stored(self) -> dict | None:
        """The labels as cache.json stores them: None when there is a problem (prepare stops)."""
        return None if self.problem else self.labels.to_index()


def collect(records, data_cfg) -> Found | None:
    """The labels of prepare's classified `records` (used ones carry their row index) for `data_cfg.labels`;
    None for `none`. Reads the caption files of the used images (tags), nothing else."""
    if data_cfg.labels == "none":
        return None
    used = [r for r in records if r.reason is None]  # path order is row order
    if data_cfg.labels == "folders":
        return _folders(records, used, data_cfg)
    return _tags(records, used, data_cfg)


def _multi_hot(names: tuple, rows: list[list[str]]) -> np.ndarray:
    """(len(rows), len(names)) uint8: 1 where a row has a name (names not in `names` are left out)."""
    column = {n: k for k, n in enumerate(names)}
    matrix = np.zeros((len(rows), len(names)), np.uint8)
    for i, row in enumerate(rows):
        matrix[i, [column[n] for n in row if n in column]] = 1
    return matrix


def _folders(records, used, data_cfg) -> Found:
    """Class = first-level folder; a class folder whose files are all skipped is a problem."""
    row_class = [shown(r.path.split("/", 1)[0]) if "/" in r.path else None for r in used]
    names = tuple(sorted({c for c in row_class if c is not None}))
    found = Found(Labels(LabelSet("folders", names), _multi_hot(names, [[c] if c else [] for c in row_class])),
                  {r.path: c for r, c in zip(used, row_class)}, data_cfg.min_class_images)
    folders: dict[str, Counter] = {}
    for r in records:
        if "/" in r.path:
            folders.setdefault(r.path.split("/", 1)[0], Counter())[r.reason or "used"] += 1
    empty = [f for f, reasons in folders.items() if "used" not in reasons]
    if empty:
        reasons = folders[empty[0]]
        n = sum(reasons.values())
        why = ", ".join(f"{k} {reason}" for reason, k in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        more = f" (and {len(empty) - 1} more such folders: {_listing([shown(f) for f in empty[1:]], 3)})" \
            if len(empty) > 1 else ""
        found.problem = (f"data.dir: class folder {shown(empty[0])} has no usable image ({n} file{'s' * (n != 1)}: "
                         f"{why}){more}; add images or move the folder out")
    elif not names:
        found.problem = (f"data.labels = folders, but no folder under {shown(str(data_cfg.dir))} holds a used image: "
                         "put each class's images in a folder of its own (data.dir/CLASS/image.png) or set "
                         "data.labels: none")
    return found


def _tags(records, used, data_cfg) -> Found:
    """Tags from each used image's caption; the vocabulary is the tags on >= data.min_tag_count images."""
    captions = {os.path.splitext(r.path)[0]: r for r in records if r.reason == CAPTION}
    read: dict[str, list[str]] = {}
    warnings = []
    row_tags = []
    for r in used:
        cap = captions.get(os.path.splitext(r.path)[0])
        if cap is not None and cap.path not in read:
            read[cap.path], why = read_caption(cap.full)
            if why:
                cap.detail += f"; {why}: read as no tags"
                warnings.append(f"caption {shown(cap.path)} {why}: read as no tags")
        row_tags.append(read[cap.path] if cap is not None else [])
    counts = Counter(t for tags in row_tags for t in tags)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    least = data_cfg.min_tag_count
    vocab = tuple(t for t in ranked if counts[t] >= least)
    found = Found(Labels(LabelSet("tags", vocab), _multi_hot(vocab, row_tags)),
                  {r.path: tags for r, tags in zip(used, row_tags)}, data_cfg.min_class_images, least,
                  {t: counts[t] for t in ranked if counts[t] < least}, warnings)
    if not vocab:
        found.problem = (f"data.labels = tags, but no tag is on at least data.min_tag_count = {least} used images "
                         f"({len(read)} caption files read, {len(counts)} distinct tags): add caption files beside "
                         "the images (img001.png + img001.txt, comma-separated tags), lower data.min_tag_count or "
                         "set data.labels: none")
    return found


def _table(items: list[tuple[str, int]]) -> list[str]:
    """`name count` cells in up to TABLE_COLUMNS columns and TABLE_ROWS rows, then '(+K more)'."""
    if not items:
        return []
    name_w = min(NAME_WIDTH, max(len(n) for n, _ in items))
    num_w = max(len(str(k)) for _, k in items)
    columns = max(1, min(TABLE_COLUMNS, (WIDTH - 4 + 3) // (name_w + 1 + num_w + 3)))
    shown_items = items[:TABLE_ROWS * columns]
    lines = []
    for start in range(0, len(shown_items), columns):
        cells = [f"{n if len(n) <= name_w else n[:name_w - 3] + '...':<{name_w}} {k:>{num_w}}"
                 for n, k in shown_items[start:start + columns]]
        lines.append("    " + "   ".join(cells).rstrip())
    if len(items) > len(shown_items):
        lines.append(f"    (+{len(items) - len(shown_items)} more)")
    return lines


def _capped(lines: list[str], what: str) -> list[str]:
    more = [f"warning: (+{len(lines) - WARNINGS} more {what})"] if len(lines) > WARNINGS else []
    return [f"warning: {line}" for line in lines[:WARNINGS]] + more


def report(found: Found) -> list[str]:
    """The balance table (images per class, in natural order, or per vocabulary tag, most frequent first), the
    unlabelled count, the rare tags and the warnings: about 40 lines at most, whatever the number of classes."""
    label_set, counts = found.labels.label_set, found.labels.counts()
    total, unlabelled = len(found.labels.matrix), found.labels.unlabelled()
    if label_set.mode == "folders":
        order = sorted(label_set.names, key=natural_key)
        head = (f"  labels from folders: {len(label_set)} classes, {total - unlabelled} images in them, "
                f"{unlabelled} unlabelled" + (" (directly in data.dir: unconditional only)" if unlabelled else ""))
    else:
        order = list(label_set.names)
        head = (f"  labels from tags: {len(label_set)} tags on >= {found.min_tag_count} images (data.min_tag_count), "
                f"{total - unlabelled} images tagged, {unlabelled} unlabelled"
                + (" (no caption, or rare tags only)" if unlabelled else ""))
    lines = [head] + _table([(name, counts[name]) for name in order])
    if found.rare:
        rare = ", ".join(f"{t} ({k})" for t, k in list(found.rare.items())[:5])
        more = f" (+{len(found.rare) - 5} more)" if len(found.rare) > 5 else ""
        line = f"  rare tags, on fewer than {found.min_tag_count} images, not conditioned on: {len(found.rare)}: " + rare
        lines.append((line[:WIDTH - len(more) - 3] + "..." if len(line) + len(more) > WIDTH else line) + more)
    small = sorted((k, natural_key(name), name) for name, k in counts.items() if k < found.min_class_images)
    plural = "classes" if label_set.mode == "folders" else "tags"
    lines += _capped([f"{label_set.kind} {name} has only {k} image{'s' * (k != 1)} (data.min_class_images = "
                      f"{found.min_class_images})" for k, _, name in small],
                     f"{plural} with fewer than {found.min_class_images} images")
    return lines + _capped(found.warnings, "caption warnings: see the caption rows of the manifest")
