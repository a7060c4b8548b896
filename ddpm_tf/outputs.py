"""Where a command's output files go: checked before the work starts, numbered by default so repeated
commands never collide (as stable-diffusion-webui numbers its outputs), never over an input, and never over
an existing file unless the user says `--overwrite`. TF-free."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import OutputError

NUMBERED_RE = re.compile(r"^(\d{5,})-")  # the NNNNN- prefix of a numbered default output


def next_number(folder: Path) -> int:
    """One above the highest NNNNN- prefix among the names in `folder` (1 in a new folder)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 1
    used = [int(m.group(1)) for m in map(NUMBERED_RE.match, names) if m]
    return max(used, default=0) + 1


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _check_folder(path: Path) -> None:
    """The folder `path` goes in exists or can be made there, and is writable."""
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputError(f"{path}: {ancestor} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{path}: {ancestor} is a file, not a folder; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {ancestor} (read-only or no permission); choose another --out")


class Outputs:
    """The files one command writes: a main file and its companions (`companions(main)`), either at an
    explicit path or, by default, numbered `NNNNN-name` in `folder`."""

    def __init__(self, out: Path | None, folder: Path, name: str, *, companions=lambda main: [],
                 inputs=(), overwrite: bool = False, suffix: str = ".png"):
        self.numbered = out is None
        self.folder, self.name, self.companions = Path(folder), name, companions
        self.inputs, self.overwrite, self.suffix = [Path(p) for p in inputs], overwrite, suffix
        self.main = self._numbered() if self.numbered else Path(out)
        if not self.numbered and self.main.suffix.lower() != suffix:
            raise OutputError(f"--out {self.main}: expected a {suffix} file name (e.g. {self.main.stem or 'out'}"
                              f"{suffix})")

    def _numbered(self) -> Path:
        return self.folder / f"{next_number(self.folder):05d}-{self.name}"

    def paths(self) -> list[Path]:
        return [self.main, *self.companions(self.main)]

    def check(self) -> None:
        """Refuse, before any work, what cannot be written or would replace an input or an existing file."""
        for path in self.paths():
            if path.is_dir():
                raise OutputError(f"{path} is a folder; give a {self.suffix} file name with --out")
            _check_folder(path)
            for source in self.inputs:
                if _same_file(path, source):
                    raise OutputError(f"{path} is an input of this command ({source}); an output never replaces "
                                      "an input: choose another --out")
            if (path.exists() or path.is_symlink()) and not self.overwrite:
                raise OutputError(f"{path} exists; pass --overwrite to replace it, or choose another --out")

    def write(self, write_all) -> Path:
        """Call `write_all(paths, overwrite)`, which writes the main file first; a numbered name that another
        command took meanwhile moves to the next free number. Returns the main path."""
        for _ in range(100):
            try:
                write_all(self.paths(), self.overwrite)
                return self.main
            except FileExistsError as exc:
                if not (self.numbered and str(exc.filename) == str(self.main)):
                    raise OutputError(f"{exc.filename} appeared while this command ran; pass --overwrite to "
                                      "replace it, or choose another --out") from None
                self.main = self._numbered()
        raise OutputError(f"{self.folder}: no free output number found")
