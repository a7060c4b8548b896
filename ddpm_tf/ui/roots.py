"""What the web page may read and serve: the runs folder, the configs folder and the data folders of those
runs and configs. Every path typed in the page or sent to it passes `Roots.check`; the same folders are the
only `allowed_paths` Gradio serves files from. TF-free."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PathError, UserError

CONFIG_SUFFIXES = (".yaml", ".yml")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class Roots:
    """The runs folder, the configs folder, and the data folders their configs name (all resolved)."""

    def __init__(self, runs: Path, configs: Path):
        self.runs, self.configs = Path(runs).resolve(), Path(configs).resolve()

    def config_files(self) -> list[Path]:
        """The config files in the configs folder, by name (not recursive)."""
        if not self.configs.is_dir():
            return []
        return sorted(p for p in self.configs.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())

    def run_configs(self) -> list[Path]:
        """The resolved config.yaml of every run under the runs folder."""
        return sorted(self.runs.glob("*/config.yaml")) if self.runs.is_dir() else []

    def data_folders(self) -> list[Path]:
        """The data.dir of every run and every config (a config that does not load is left out)."""
        from ..config import load_config

        found = []
        for config in [*self.run_configs(), *self.config_files()]:
            try:
                folder = Path(load_config(config).data.dir).expanduser().resolve()
            except (UserError, OSError):
                continue
            if folder not in found:
                found.append(folder)
        return found

    def folders(self) -> list[Path]:
        """Every folder the page may read, resolved: what Gradio is allowed to serve."""
        return [self.runs, self.configs, *self.data_folders()]

    def check(self, text, what: str = "path", must_exist: bool = True) -> Path:
        """The resolved path of `text` when it lies inside one of the roots (symlinks followed); PathError
        (one line) for `..`, an absolute path elsewhere, a symlink out of the roots, or a missing file."""
        raw = str(text or "").strip()
        if not raw:
            raise PathError(f"{what}: empty; give a file under {self.runs} or {self.configs}")
        path = Path(raw).expanduser()
        if ".." in path.parts:
            raise PathError(f"{what} {raw}: '..' is refused; give a path inside the runs, configs or data folders")
        resolved = path.resolve()  # follows every symlink: a link out of the roots resolves outside them
        folders = self.folders()
        if not any(_inside(resolved, folder) for folder in folders):
            via = f" (a link to {resolved})" if resolved != Path(os.path.abspath(path)) else ""
            raise PathError(f"{what} {raw}{via} is outside the folders this page may read: "
                            + ", ".join(str(f) for f in folders[:4]) + (", ..." if len(folders) > 4 else ""))
        if must_exist and not resolved.exists():
            raise PathError(f"{what} {raw}: no such file")
        return resolved

    def run(self, name: str) -> Path:
        """The run folder `name` (a folder name under the runs folder, or a path inside it)."""
        path = self.check(name if os.sep in str(name) or "/" in str(name) else self.runs / str(name), "run")
        if not _inside(path, self.runs) or path == self.runs:
            raise PathError(f"run {name}: not a run under {self.runs}")
        return path
