"""The prepared-images cache on disk: uint8 .npy shards, an index (cache.json) and a manifest.

Layout of a cache folder:

    cache.json                  format version, decode settings, shard list with sizes and sha256,
                                per-content results (keyed by the file's sha256), per-path stat data and
                                the labels of the rows (data.labels; null when off)
    manifest.json               one row per file under the source folder: what happened to it
    images-GEN-00000.npy ...    (rows, S, S, C) uint8 shards; image i of the training set is row
                                i % rows_per_shard of shard i // rows_per_shard

Writes are atomic and ordered so that a kill at any moment leaves either the old or the new cache:
new shards get a fresh generation name GEN, cache.json is replaced last (the commit), and the old
generation is deleted after it; shards of a run that fails before its commit are removed again.
cache.json is ASCII JSON: a file name that is not UTF-8 (lone surrogates in Python) is kept exactly, as
\\udcNN escapes, so that the next run finds it again. `load_cache` checks the version, the settings, every shard's size,
header and sha256, and says why it rejects a cache; the caller rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..images import atomic_write_bytes
from .decode import open_regular, shown
from .labels import Labels

FORMAT = "ddpm_tf prepared images"
VERSION = 2  # 2: near-duplicate thumbnails replace mean colours in the entries
INDEX = "cache.json"
MANIFEST = "manifest.json"
SHARD_BYTES = 64 * 2**20  # big enough for sequential reads, small enough to write in memory
# Only files of these exact shapes are ever deleted: --out may point at a folder holding other files.
OWN_FILES = re.compile(r"images-[0-9a-f]{8}-\d{5}\.npy|\.(images-[0-9a-f]{8}-\d{5}\.npy|cache\.json|manifest\.json)"
                       r"\.tmp-\d+|\.staging-\d+\.npy")


def settings_dict(settings) -> dict:
    """DecodeSettings as plain JSON types (tuples become lists), the form stored in cache.json."""
    return json.loads(json.dumps(asdict(settings)))


def file_sha256(path: Path, chunk: int = 2**20) -> str:
    """sha256 of a file's bytes, read in chunks (data.NotRegularFile if it is no longer a regular file)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_problem(out: Path, auto: bool, problem: str) -> DataError:
    """One line naming the cache folder (`auto`: the default one) and what is wrong with it, with the way out."""
    where = f"data.cache: {shown(str(out))}" + (" (the default, under the working directory)" if auto else "")
    return DataError(f"{where} {problem}: give a writable folder with --out (ddpm prepare) or data.cache")


def check_folder(out: Path, auto: bool) -> bool:
    """Refuse, before any work, a cache path that is not a folder or cannot be created. Returns whether the
    folder can be written: an existing read-only cache is still read when nothing in it needs writing."""
    if os.path.lexists(out) and not out.is_dir():
        raise folder_problem(out, auto, f"is {'a file' if out.is_file() else 'not a folder'}, expected a folder")
    base = out
    while not os.path.lexists(base) and base != base.parent:
        base = base.parent  # the nearest existing folder: where the cache folder would be created
    if not base.is_dir():
        raise folder_problem(out, auto, f"cannot be created: {shown(str(base))} is a file")
    if os.access(base, os.W_OK | os.X_OK):
        return True
    if base == out:
        return False
    raise folder_problem(out, auto, f"cannot be created: {shown(str(base))} is not writable")


@contextlib.contextmanager
def writing(out: Path, auto: bool):
    """An OSError while writing the cache (a full disk, permissions changed since the check) as one clear line."""
    try:
        yield
    except OSError as exc:
        raise folder_problem(out, auto, f"could not be written ({exc.strerror or type(exc).__name__})") from None


class ShardedImages:
    """(N, S, S, C) uint8 images across memory-mapped .npy shards, read by index: memory use stays bounded."""

    def __init__(self, paths: list[Path], rows_per_shard: int, count: int, shape: tuple):
        self.paths, self.rows_per_shard, self.count = list(paths), rows_per_shard, count
        self.shape = (count,) + tuple(shape)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.paths[k], mmap_mode="r")
        return self._maps[k]

    def take(self, index) -> np.ndarray:
        """Rows `index` (any order) as one (len(index), S, S, C) array."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index),) + self.shape[1:], np.uint8)
        shard, row = np.divmod(index, self.rows_per_shard)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._shard(int(k))[row[sel]]
        return out

    def load(self) -> np.ndarray:
        """All images in memory as one array."""
        return self.take(np.arange(self.count))


class Cache:
    """A validated cache folder: its index (cache.json) and a reader of its images."""

    def __init__(self, path: Path, index: dict):
        self.path, self.index = Path(path), index

    @property
    def entries(self) -> dict:
        return self.index["entries"]

    @property
    def files(self) -> dict:
        return self.index["files"]

    @property
    def used(self) -> list[str]:
        """Content hashes of the training set in row order."""
        rows = {e["row"]: h for h, e in self.entries.items() if e.get("row") is not None}
        return [rows[i] for i in range(len(rows))]

    def labels(self) -> Labels | None:
        """The labels of the rows (labels.Labels, in row order), or None: written without data.labels."""
        stored = self.index.get("labels")
        return None if stored is None else Labels.from_index(stored, self.index["count"])

    def images(self) -> ShardedImages:
        shards = self.index["shards"]
        rows = shards[0]["rows"] if shards else 1
        return ShardedImages([self.path / s["file"] for s in shards], rows, self.index["count"],
                             tuple(self.index["shape"]))


def load_cache(path: Path, settings, verify: bool = True) -> tuple[Cache | None, str | None]:
    """(Cache, None) when `path` holds a sound cache for `settings`; (None, why not) otherwise (why is
    None when there is simply no cache yet). `verify=False` skips the shards' sha256 (sizes and headers
    are always checked): for a cache this process has just checked or written."""
    path = Path(path)
    if not (path / INDEX).exists():
        return None, None
    try:
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            return None, (f"it was written by another version (format {index.get('format')!r} version "
                          f"{index.get('version')!r}, this is version {VERSION})")
        if index["settings"] != settings_dict(settings):
            changed = sorted(k for k, v in settings_dict(settings).items() if index["settings"].get(k) != v)
            return None, f"it was made with other settings ({', '.join(changed)} differ)"
        problem = _check_shards(path, index, verify)
        Cache(path, index).labels()  # raises if they are damaged
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        return None, f"its index {path / INDEX} is damaged ({type(exc).__name__}: {exc})"
    if problem:
        return None, problem
    return Cache(path, index), None


def _check_shards(path: Path, index: dict, verify: bool) -> str | None:
    """Why the shards do not match the index (size, header, sha256 when `verify`), or None."""
    total = 0
    for s in index["shards"]:
        f = path / s["file"]
        if not f.is_file():
            return f"shard {f.name} is missing"
        if f.stat().st_size != s["bytes"] or verify and file_sha256(f) != s["sha256"]:
            return f"shard {f.name} is damaged (size or checksum differs from the index)"
        arr = np.load(f, mmap_mode="r")
        if arr.dtype != np.uint8 or list(arr.shape[1:]) != index["shape"] or arr.shape[0] != s["rows"]:
            return f"shard {f.name} holds {arr.dtype} {arr.shape}, the index says uint8 {index['shape']}"
        total += s["rows"]
    if total != index["count"]:
        return f"the shards hold {total} images, the index says {index['count']}"
    return None


def rows_per_shard(shape: tuple) -> int:
    return max(1, SHARD_BYTES // int(np.prod(shape)))


def write_shards(path: Path, count: int, shape: tuple, rows_of, written: list) -> list[dict]:
    """Write `count` images as new-generation shards; `rows_of(start, stop)` returns those rows. Returns
    the shard list for the index; each file name is appended to `written` as soon as it exists."""
    generation = uuid.uuid4().hex[:8]
    per = rows_per_shard(shape)
    shards = []
    for k, start in enumerate(range(0, count, per)):
        block = np.ascontiguousarray(rows_of(start, min(count, start + per)), dtype=np.uint8)
        buf = io.BytesIO()
        np.save(buf, block)
        data = buf.getvalue()
        name = f"images-{generation}-{k:05d}.npy"
        written.append(name)
        atomic_write_bytes(path / name, data)
        shards.append({"file": name, "rows": len(block), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    return shards


def commit(path: Path, index: dict, manifest: dict) -> None:
    """Replace cache.json (the commit point), write the manifest, then delete files the index no longer names.
    Both are encoded first, so that nothing can fail for their content after the commit."""
    index = {"format": FORMAT, "version": VERSION, **index}
    index_bytes = json.dumps(index).encode("ascii")
    manifest_bytes = _manifest_bytes(manifest)
    atomic_write_bytes(path / INDEX, index_bytes)
    atomic_write_bytes(path / MANIFEST, manifest_bytes)
    keep = {s["file"] for s in index["shards"]}
    for f in path.iterdir():
        if f.name not in keep and OWN_FILES.fullmatch(f.name):
            try:
                f.unlink()
            except OSError:  # e.g. still memory-mapped by a trainer on Windows: removed next time
                pass


def discard_uncommitted(path: Path, names: list[str]) -> None:
    """Delete the files `names` (shards of a failed run) unless the index on disk names them."""
    try:
        named = {s["file"] for s in json.loads((Path(path) / INDEX).read_text(encoding="utf-8"))["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        named = set()
    for name in names:
        if name not in named:
            try:
                (Path(path) / name).unlink(missing_ok=True)
            except OSError:  # the original failure matters more; OWN_FILES go at the next commit anyway
                pass


def _manifest_bytes(manifest: dict) -> bytes:
    """The manifest as strict UTF-8 JSON (its strings are already valid Unicode: prepare shows odd names)."""
    return json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8")


def write_manifest_only(path: Path, manifest: dict) -> None:
    """The manifest alone, unless the one on disk says the same: for a folder with no usable image (there is
    no cache to commit), or when only files outside the index changed (a new caption or non-image file)."""
    data = _manifest_bytes(manifest)
    try:
        if (Path(path) / MANIFEST).read_bytes() == data:
            return
    except OSError:  # none yet, or unreadable: write it
        pass
    atomic_write_bytes(Path(path) / MANIFEST, data)


class Staging:
    """Pixels decoded in this run, by content hash: in memory when small, else in a memory-mapped file in
    the cache folder, so a first run over a huge folder does not hold every image in memory."""

    def __init__(self, folder: Path, count: int, shape: tuple):
        self.rows: dict[str, int] = {}
        self.path = None
        if count * int(np.prod(shape)) > 256 * 2**20:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f".staging-{os.getpid()}.npy"
            self.store = np.lib.format.open_memmap(self.path, "w+", np.uint8, (count,) + shape)
        else:
            self.store = np.empty((count,) + shape, np.uint8)
        self.extra: dict[str, np.ndarray] = {}

    def __contains__(self, h: str) -> bool:
        return h in self.rows or h in self.extra

    def put(self, h: str, pixels) -> None:
        if pixels is None:
            return
        if len(self.rows) < len(self.store):
            self.rows[h] = len(self.rows)
            self.store[self.rows[h]] = pixels
        else:
            self.extra[h] = pixels

    def get(self, h: str) -> np.ndarray:
        return self.store[self.rows[h]] if h in self.rows else self.extra[h]

    def close(self) -> None:
        self.store = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
