"""`ddpm prepare`: any folder of images -> a checked, cached, reported training set.

Every file under the source folder ends in exactly one row of the manifest: used (with its index in
the training set) or skipped with a reason. The steps, in order:

1. scan: walk the folder (following folder links, but never into one that contains a folder on the way
   down, the source's own ancestors included), in sorted path order; links that loop or dangle and
   non-regular files are skipped here;
2. hash: sha256 of each candidate's bytes (reused from the cache when size, mtime and path are unchanged);
3. decode: each distinct content not already in the cache, in parallel processes (data.decode_file);
4. deduplicate: of each content, a regular file is kept before a link (a file link, or anything reached
   through a folder link), then the first in path order; the others are exact duplicates; then near
   duplicates by perceptual hash (data.near_duplicate_threshold bits of 64), in the same preference order;
5. label (data.labels, labels.py): each used image's class folder or caption tags, computed afresh;
6. write: shards, cache.json (with the labels) and manifest.json into the cache folder (cache.py), never
   under the source. The cache folder is checked (creatable, writable, not a file) before anything is scanned.

File names are kept exactly as the OS gives them (on POSIX a name that is not UTF-8 holds lone surrogates,
which cache.json stores as JSON \\u escapes); the manifest and the summary show such a name with each
undecodable byte as \\xNN (`data.shown`), and the manifest row adds `path_bytes`, the exact name in hex.

The decoded results are keyed by content hash and decode settings, so an unchanged folder decodes
nothing and ten new images decode ten. No TensorFlow here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import re
import stat
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from . import cache as cache_mod
from . import labels as labels_mod
from .decode import (
    IMAGE_SUFFIXES,
    NOT_A_FILE,
    NOT_AN_IMAGE,
    UNREADABLE,
    Decoded,
    DecodeSettings,
    NotRegularFile,
    decode_file,
    settings_from_config,
    shown,
)

DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near-duplicate"
SYMLINK_LOOP = "symlink-loop"
BROKEN_LINK = "broken-link"
SERIAL_BELOW = 24  # fewer decodes than this run in this process: starting workers costs ~0.5 s each
THUMB = 16  # near duplicates are confirmed on 16x16 grayscale thumbnails of the decoded images


@dataclass
class FileRecord:
    """One file under the source folder and what happened to it."""

    path: str  # relative to the source, with / separators
    full: Path
    size: int = -1
    mtime_ns: int = 0
    sha256: str | None = None
    reason: str | None = None  # None: used
    detail: str = ""
    index: int | None = None
    duplicate_of: str | None = None
    via_link: bool = False  # a file link, or reached through a folder link: a real file is kept before it


@dataclass
class Prepared:
    """The result of `prepare`: where the cache is, and what was done."""

    cache_dir: Path
    manifest: Path
    files: list[FileRecord]
    settings: DecodeSettings
    decoded: int = 0  # decode_file calls in this run (0 for an unchanged folder)
    reused: int = 0  # contents whose result came from the cache
    rebuilt: str | None = None  # why an existing cache was not trusted
    faces: Counter = field(default_factory=Counter)
    label_info: labels_mod.Found | None = None  # None with data.labels: none

    @property
    def labels(self) -> labels_mod.Labels | None:
        """The labels of the rows of `images()` (None with data.labels: none)."""
        return None if self.label_info is None else self.label_info.labels

    @property
    def count(self) -> int:
        return sum(1 for r in self.files if r.reason is None)

    def reasons(self) -> Counter:
        return Counter(r.reason or "used" for r in self.files)

    def images(self, memory_mb: float = 1024):
        """The training set: an in-memory array up to `memory_mb`, else memory-mapped shards."""
        cache, why = cache_mod.load_cache(self.cache_dir, self.settings, verify=False)  # prepare checked it
        if cache is None:
            raise DataError(f"{shown(str(self.cache_dir))}: the cache changed while in use ({why}); run ddpm prepare again")
        reader = cache.images()
        return reader.load() if reader.nbytes <= memory_mb * 2**20 else reader


def cache_dir_for(src: Path, data_cfg, settings: DecodeSettings) -> Path:
    """data.cache, or for 'auto' data/cache/NAME-KEY with KEY from the source's absolute path and the settings."""
    if data_cfg.cache != "auto":
        return Path(data_cfg.cache)
    key = json.dumps({"source": str(src.resolve()), "settings": cache_mod.settings_dict(settings),
                      "version": cache_mod.VERSION}, sort_keys=True)
    name = re.sub(r"[^\w.-]+", "_", src.resolve().name) or "root"
    return Path("data") / "cache" / f"{name}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def _encloses(folder: str, chain: tuple) -> bool:
    """Whether real path `folder` is, or contains, one of the folders on the way down (`chain`)."""
    prefix = folder.rstrip(os.sep) + os.sep
    return any(c == folder or c.startswith(prefix) for c in chain)


def _loop_detail(full: Path, is_link: bool, real: str) -> str:
    try:
        target = os.readlink(full) if is_link else real
    except OSError:  # replaced since the scan looked at it
        target = real
    return f"link to {shown(target)}, a folder containing it" if is_link else f"{shown(real)} contains it"


def scan(root: Path) -> list[FileRecord]:
    """Every entry under `root` that is not a folder, in sorted path order; loops, dangling links and
    special files already carry their reason."""
    records: list[FileRecord] = []

    def walk(folder: Path, rel: str, chain: tuple, linked: bool):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            records.append(FileRecord(rel or ".", folder, reason=UNREADABLE, detail=f"folder: {exc.strerror}"))
            return
        for e in entries:
            r, full = f"{rel}/{e.name}" if rel else e.name, folder / e.name
            try:
                is_link = e.is_symlink()
                st = os.stat(full)  # follows links
            except OSError as exc:
                is_link = os.path.islink(full)  # never raises
                loop = exc.errno == errno.ELOOP
                reason = (SYMLINK_LOOP if loop else BROKEN_LINK) if is_link else UNREADABLE
                records.append(FileRecord(r, full, reason=reason, detail=exc.strerror or "", via_link=True))
                continue
            via = linked or is_link
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(full)
                if _encloses(real, chain):  # following it would walk a folder already on the way down again
                    records.append(FileRecord(r, full, reason=SYMLINK_LOOP, detail=_loop_detail(full, is_link, real),
                                              via_link=via))
                else:
                    walk(full, r, chain + (real,), via)
            elif not stat.S_ISREG(st.st_mode):
                records.append(FileRecord(r, full, reason=NOT_A_FILE, detail="a device, socket or pipe", via_link=via))
            else:
                rec = FileRecord(r, full, size=st.st_size, mtime_ns=st.st_mtime_ns, via_link=via)
                if full.suffix.lower() not in IMAGE_SUFFIXES:
                    rec.reason = NOT_AN_IMAGE
                    rec.detail = f"extension {shown(full.suffix) or '(none)'!r} is not an image's"
                records.append(rec)

    walk(root, "", (os.path.realpath(root),), False)
    return records


def _hash_files(records: list[FileRecord], old_files: dict) -> None:
    """Fill in each candidate's sha256; reuse the cached one when size, mtime and path are unchanged."""
    for rec in records:
        if rec.reason is not None:
            continue
        old = old_files.get(rec.path)
        if old and old["size"] == rec.size and old["mtime_ns"] == rec.mtime_ns:
            rec.sha256 = old["sha256"]
            continue
        try:
            rec.sha256 = cache_mod.file_sha256(rec.full)
        except NotRegularFile:  # replaced by a pipe or device since the scan
            rec.reason, rec.detail = NOT_A_FILE, "a device, socket, pipe or folder"
        except OSError as exc:
            rec.reason, rec.detail = UNREADABLE, exc.strerror or type(exc).__name__


def decode_all(jobs: list[tuple[str, Path]], settings: DecodeSettings, workers: int, progress=None):
    """Yield (key, Decoded) for each (key, path) job, in parallel 'spawn' processes unless the batch is small.

    'spawn' rather than 'fork': `ddpm train` calls this after importing TensorFlow, whose threads do not
    survive a fork."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < SERIAL_BELOW:
        for key, path in jobs:
            yield key, decode_file(path, settings)
            progress and progress.update(1)
        return
    chunk = max(1, min(32, len(jobs) // (workers * 8)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        results = pool.map(decode_file, [str(p) for _, p in jobs], repeat(settings), chunksize=chunk)
        for (key, _), result in zip(jobs, results):
            yield key, result
            progress and progress.update(1)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """A (THUMB * THUMB,) uint8 grayscale thumbnail of decoded (S, S, C) pixels."""
    gray = pixels.mean(axis=-1) if pixels.shape[-1] > 1 else pixels[..., 0]
    im = Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8)).resize((THUMB, THUMB), Image.BOX)
    return np.asarray(im, np.uint8).reshape(-1)


def near_duplicates(candidates: list[tuple[str, int, np.ndarray]], threshold: int,
                    max_rms: float) -> dict[str, tuple[str, int, float]]:
    """{path: (earlier kept path, hash bits apart, thumbnail RMS)} for each candidate (path, 64-bit hash,
    thumbnail), in order, within `threshold` bits AND `max_rms` grey levels of a kept one.

    The hash finds candidates fast; the thumbnails decide. Distinct photos of one person in one pose
    (the ORL faces) are often 2-6 hash bits apart, yet 5-20 grey levels RMS apart on 16x16 thumbnails,
    where a JPEG re-encode or a resized copy is about 1 level apart. Vectorised over the kept images.
    """
    if threshold < 0 or not candidates:
        return {}
    kept_hash = np.zeros((len(candidates), 8), np.uint8)
    kept_thumb = np.zeros((len(candidates), THUMB * THUMB), np.float32)
    kept_path: list[str] = []
    found = {}
    for path, phash, thumb in candidates:
        k, h = len(kept_path), np.frombuffer(phash.to_bytes(8, "little"), np.uint8)
        if k:
            bits = _POPCOUNT8[kept_hash[:k] ^ h].sum(axis=1, dtype=np.int64)
            near = np.flatnonzero(bits <= threshold)
            if near.size:
                rms = np.sqrt(np.mean(np.square(kept_thumb[near] - thumb), axis=1))
                if rms.min() <= max_rms:
                    i = int(near[np.argmin(rms)])
                    found[path] = (kept_path[i], int(bits[i]), float(rms.min()))
                    continue
        kept_hash[k], kept_thumb[k] = h, thumb
        kept_path.append(path)
    return found


def _entry(result: Decoded) -> dict:
    """A decode result as stored in cache.json (the pixels go to the shards)."""
    thumb = "" if result.pixels is None else thumbnail(result.pixels).tobytes().hex()
    return {"reason": result.reason, "detail": result.detail, "phash": f"{result.phash:016x}", "thumb": thumb,
            "face": result.face, "row": None}


def _preferred(records: list[FileRecord]) -> list[FileRecord]:
    """Records in the order in which one of identical or near-identical contents is kept: regular files before
    links (a file link, or reached through a folder link), then path order."""
    return sorted(records, key=lambda r: r.via_link)  # stable: path order within each group


def _classify(records: list[FileRecord], entries: dict, threshold: int, max_rms: float) -> None:
    """Reasons from decoding, then exact and near duplicates (regular files kept before links, then the first in
    path order), then indices in path order."""
    for rec in records:
        if rec.reason is None and entries[rec.sha256]["reason"]:
            rec.reason, rec.detail = entries[rec.sha256]["reason"], entries[rec.sha256]["detail"]
    first_of: dict[str, str] = {}
    for rec in _preferred([r for r in records if r.reason is None]):
        if rec.sha256 in first_of:
            rec.reason, rec.duplicate_of = DUPLICATE, first_of[rec.sha256]
            rec.detail = f"same bytes as {shown(rec.duplicate_of)}"
        else:
            first_of[rec.sha256] = rec.path
    live = _preferred([rec for rec in records if rec.reason is None])
    near = near_duplicates([(r.path, int(entries[r.sha256]["phash"], 16),
                             np.frombuffer(bytes.fromhex(entries[r.sha256]["thumb"]), np.uint8)) for r in live],
                           threshold, max_rms)
    for rec in live:
        if rec.path in near:
            rec.duplicate_of, bits, rms = near[rec.path]
            rec.reason = NEAR_DUPLICATE
            rec.detail = (f"{bits} of 64 perceptual-hash bits and {rms:.1f} grey levels RMS from "
                          f"{shown(rec.duplicate_of)}")
    for i, rec in enumerate(r for r in records if r.reason is None):
        rec.index = i


def _check_outside(out: Path, src: Path) -> None:
    """The source folder is only ever read: refuse a cache inside it."""
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents:
        raise DataError(f"data.cache: {out} is inside the source folder {src}, which is never written to: "
                        "expected a folder outside it (data.cache, or --out for ddpm prepare)")


def prepare(data_cfg, *, echo=print, progress_factory=None, only_changes=False, draft=True) -> Prepared:
    """Scan, hash, decode what is new, deduplicate and write the cache of `data_cfg.dir`; print a summary
    (with `only_changes`, only when something was decoded or skipped)."""
    src = Path(data_cfg.dir)
    if not src.is_dir():
        raise DataError(f"data.dir: {shown(str(src))} is not a folder (expected a folder of images)")
    settings = settings_from_config(data_cfg, draft)
    out, auto, writable, old, why = _open_cache(src, data_cfg, settings, echo)
    records = scan(src)
    if data_cfg.labels == "tags":
        labels_mod.mark_captions(records)
    _hash_files(records, old.files if old else {})

    # --- decode each content the cache does not know -----------------------------------------------
    entries = dict(old.entries) if old else {}
    first_path = {}
    for rec in _preferred(records):
        if rec.reason is None:
            first_path.setdefault(rec.sha256, rec.full)
    todo = [(h, p) for h, p in first_path.items() if h not in entries]
    if not writable and todo:
        raise cache_mod.folder_problem(out, auto, f"is not writable, and {len(todo)} new or changed files need decoding")
    result = Prepared(out, out / cache_mod.MANIFEST, records, settings, rebuilt=why,
                      reused=len(first_path) - len(todo))
    with cache_mod.writing(out, auto):
        staged = cache_mod.Staging(out, len(todo), (settings.size, settings.size, settings.channels))
    try:  # the staging file (of a large first run) goes whatever happens
        bar = progress_factory(total=len(todo), desc="decode") if progress_factory and len(todo) >= SERIAL_BELOW \
            else None
        used, old_rows = _decode_and_classify(todo, first_path, entries, old, staged, records, data_cfg, result, bar)
        result.label_info = info = labels_mod.collect(records, data_cfg)
        stored = info.stored() if info else None
        manifest = _manifest(src, out, settings, records, info)
        with cache_mod.writing(out, auto):
            if not used:
                out.mkdir(parents=True, exist_ok=True)
                cache_mod.write_manifest_only(out, manifest)
            else:  # the decoded images are kept even when the labels stop prepare below
                _write(out, old, used, old_rows, staged, entries, records, settings, manifest, stored)
    finally:
        staged.close()
    if not used:
        echo(summary(result))
        raise DataError(f"data.dir: no usable image under {shown(str(src))} ({len(records)} files; reasons above and "
                        f"in {shown(str(result.manifest))})")
    if info and info.problem:
        echo(summary(result))
        raise DataError(info.problem)
    skipped = any(r.reason not in (None, labels_mod.CAPTION) for r in records)
    relabelled = old is None or old.index.get("labels") != stored
    if not only_changes or result.decoded or skipped or relabelled:
        echo(summary(result))
    return result


def _open_cache(src: Path, data_cfg, settings, echo):
    """(folder, is it the default, writable, the old cache or None, why it was not used): checked before
    anything under `src` is read."""
    out, auto = cache_dir_for(src, data_cfg, settings), data_cfg.cache == "auto"
    _check_outside(out, src)
    writable = cache_mod.check_folder(out, auto)
    old, why = cache_mod.load_cache(out, settings)
    if not writable and old is None:
        raise cache_mod.folder_problem(out, auto, "is not writable, and " + (
            f"its cache cannot be used ({why})" if why else "holds no cache to read instead"))
    if why:
        echo(f"cache {shown(str(out))}: not used because {why}; rebuilding it")
    return out, auto, writable, old, why


def _decode_and_classify(todo, first_path, entries, old, staged, records, data_cfg, result, bar):
    """Decode the new contents into `staged`, mark duplicates and near duplicates, and decode the contents
    used now whose pixels were never kept (earlier near duplicates). Returns (used hashes, old cache rows)."""
    settings = result.settings
    for h, decoded in decode_all(todo, settings, data_cfg.workers, bar):
        entries[h] = _entry(decoded)
        staged.put(h, decoded.pixels)
    bar and bar.close()
    result.decoded = len(todo)
    _classify(records, entries, data_cfg.near_duplicate_threshold, data_cfg.near_duplicate_rms)
    used = [rec.sha256 for rec in records if rec.reason is None]
    old_rows = {h: e["row"] for h, e in (old.entries.items() if old else ()) if e.get("row") is not None}
    missing = [(h, first_path[h]) for h in used if h not in staged and h not in old_rows]
    for h, decoded in decode_all(missing, settings, 1):
        staged.put(h, decoded.pixels)
    result.decoded += len(missing)
    result.faces = Counter(entries[h]["face"] for h in used) if settings.crop == "face" else Counter()
    return used, old_rows


def _write(out, old, used, old_rows, staged, entries, records, settings, manifest, labels) -> None:
    """New shards unless the training set is unchanged, then the index (with `labels`, the stored form) and the
    manifest (cache.commit); the shards of this run are removed again if anything fails before the index names
    them."""
    shape = (settings.size, settings.size, settings.channels)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    try:
        if old is not None and old.used == used:
            shards = old.index["shards"]
        else:
            reader = old.images() if old is not None else None

            def rows_of(start, stop):
                block = np.empty((stop - start,) + shape, np.uint8)
                for j, h in enumerate(used[start:stop]):
                    block[j] = staged.get(h) if h in staged else reader.take([old_rows[h]])[0]
                return block

            shards = cache_mod.write_shards(out, len(used), shape, rows_of, written)
            del reader
        staged.close()
        present = {rec.sha256 for rec in records if rec.sha256}
        kept = {h: {**e, "row": None} for h, e in entries.items() if h in present}
        for i, h in enumerate(used):
            kept[h]["row"] = i
        files = {rec.path: {"size": rec.size, "mtime_ns": rec.mtime_ns, "sha256": rec.sha256}
                 for rec in records if rec.sha256}
        index = {"settings": cache_mod.settings_dict(settings), "source": manifest["source"], "shape": list(shape),
                 "count": len(used), "shards": shards, "entries": kept, "files": files, "labels": labels}
        if old is not None and {k: old.index.get(k) for k in index} == index:
            if os.access(out, os.W_OK | os.X_OK):  # a read-only cache is used as it is, its manifest too
                cache_mod.write_manifest_only(out, manifest)  # files the index does not list may have changed
            return
        cache_mod.commit(out, index, manifest)
    except BaseException:
        cache_mod.discard_uncommitted(out, written)
        raise


def _manifest(src: Path, out: Path, settings: DecodeSettings, records: list[FileRecord], info=None) -> dict:
    """The manifest: one row per file, and the counts per status. Every string is valid Unicode (`shown`);
    a name that is not UTF-8 also gets `path_bytes`, its exact bytes in hex. With labels (`info`), each row
    gets `label` (its class or null) or `tags` (all its tags, rare ones too); null for a skipped file."""
    rows = []
    for r in records:
        row = {"path": shown(r.path), "sha256": r.sha256, "status": "used" if r.reason is None else "skipped",
               "reason": r.reason, "detail": shown(r.detail), "index": r.index,
               "duplicate_of": None if r.duplicate_of is None else shown(r.duplicate_of)}
        if info is not None:
            row[info.key] = info.values.get(r.path)
        if row["path"] != r.path:
            row["path_bytes"] = os.fsencode(r.path).hex()
        rows.append(row)
    counts = Counter(r.reason or "used" for r in records)
    return {"source": shown(str(src.resolve())), "cache": shown(str(out.resolve())),
            "settings": cache_mod.settings_dict(settings), "counts": dict(sorted(counts.items())), "files": rows}


REASON_ORDER = ("used", labels_mod.CAPTION, DUPLICATE, NEAR_DUPLICATE, "too-small", "not-an-image", "empty",
                "truncated-or-corrupt", "decompression-bomb", UNREADABLE, SYMLINK_LOOP, BROKEN_LINK, NOT_A_FILE)
FACE_NOTES = {"found": "centred on the largest face", "none": "with no face found, centre-cropped instead",
              "no-opencv": "centre-cropped instead: OpenCV not installed (pip install ddpm_tf[face])"}


def summary(result: Prepared, examples: int = 3, width: int = 110) -> str:
    """Counts per reason with the first few files of each: one screen whatever the folder's size."""
    s = result.settings
    kind = {1: "grayscale", 3: "RGB"}[s.channels]
    reasons = result.reasons()
    lines = [f"prepared {len(result.files)} files -> {shown(str(result.cache_dir))}",
             f"  {s.size}x{s.size} {kind}, crop {s.crop}: {reasons['used']} used, decoded {result.decoded} "
             f"(and {result.reused} from the cache)"]
    for reason in sorted(reasons, key=lambda r: (REASON_ORDER + (r,)).index(r)):
        if reason == "used":
            lines.append(f"  {'used':<22}{reasons[reason]:>6}")
            continue
        recs = [r for r in result.files if r.reason == reason]
        names = ", ".join(shown(r.path) + (f" ({shown(r.detail)})" if i == 0 and r.detail else "")
                          for i, r in enumerate(recs[:examples]))
        more = f" (+{len(recs) - examples} more)" if len(recs) > examples else ""
        line = f"  {reason:<22}{len(recs):>6}  {names}"
        lines.append((line[:width - len(more) - 3] + "..." if len(line) + len(more) > width else line) + more)
    for note, n in sorted(result.faces.items()):
        lines.append(f"  face crop: {n} images {FACE_NOTES.get(note, note)}")
    lines.append(f"  manifest: {shown(str(result.manifest))}")
    if result.label_info is not None:
        lines += labels_mod.report(result.label_info)  # the balance table
    return "\n".join(lines)
