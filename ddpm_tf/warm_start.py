"""`ddpm train --init-from RUN[@STEP]` (`train.init_from`): a new run's first weights are another run's EMA export
(only read), with a fresh optimizer and step counter. The network shape must be the same; the label embedding
may differ (other classes or tags, or none), and is then initialised fresh, and so may the augmentation
embedding (train.augment_p on in one run only), which then starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, RunError
from .runs import RunDir, read_export

# The parts of the network allowed to differ, by weight-name prefix: (what it is, why it is fresh, why left out).
OPTIONAL = {
    "label_emb/": ("the label embedding", "starts fresh: this run's labels are not the source's",
                   "is left out: this run has no labels"),
    "augment_emb/": ("the augmentation embedding", "starts at zero: the source trained without augmentation",
                     "is left out: this run trains without augmentation"),
}


def _optional(key: str) -> str | None:
    return next((prefix for prefix in OPTIONAL if key.startswith(prefix)), None)


@dataclass(frozen=True)
class Source:
    """The export a new run starts from."""

    run: Path
    step: int
    path: Path

    @property
    def text(self) -> str:
        return f"{self.run}@{self.step}"


def find_source(text: str, target: RunDir) -> Source:
    """`RUN` (its newest export) or `RUN@STEP` -> the export; RunError or ConfigError (one line) otherwise."""
    run_text, sep, step_text = text.rpartition("@")
    if not sep or not step_text.isdigit():  # no @STEP (a folder name may hold an @ itself)
        run_text, step_text = text, ""
    run = RunDir(Path(run_text).expanduser())
    if not run.config_path.is_file():
        raise RunError(f"train.init_from {text}: {run.path} is not a run (no config.yaml); expected RUN or RUN@STEP")
    if run.path.resolve() == target.path.resolve():
        raise ConfigError(f"train.init_from {text}: that is this run itself; to continue it, drop --init-from")
    step, path = run.latest_export(int(step_text) if step_text else None)
    return Source(run.path, step, path)


def _layer(key: str) -> str:
    return key.rsplit("/", 1)[0]


def warm_start(models, source: Source) -> str | None:
    """Assign the source's weights to every model in `models` (the network and its EMA copy); returns a note
    when an optional part (label or augmentation embedding) could not come from the source or was left out.
    ConfigError naming the first layer that does not match."""
    from .compat import variable_key

    arrays, _ = read_export(source.path)
    fresh = set()
    for model in models:
        keys = set()
        for v in model.weights:
            key = variable_key(v)
            keys.add(key)
            have = arrays.get(key)
            if have is not None and tuple(have.shape) == tuple(v.shape):
                v.assign(have)
            elif _optional(key):
                fresh.add(_optional(key))
            else:
                there = "is missing there" if have is None else f"is {tuple(have.shape)} there"
                raise ConfigError(f"train.init_from {source.text}: layer {_layer(key)} ({key.rsplit('/', 1)[1]} "
                                  f"{tuple(v.shape)} here) {there}: the same network (model.* and data.channels) "
                                  "is required")
        extra = sorted(k for k in arrays if k not in keys and not _optional(k))
        if extra:
            raise ConfigError(f"train.init_from {source.text}: layer {_layer(extra[0])} is there but not in this "
                              "network: the same network (model.* and data.channels) is required")
    left_out = {_optional(k) for k in arrays if _optional(k)} - {_optional(k) for k in keys if _optional(k)}
    notes = [f"{OPTIONAL[p][0]} {OPTIONAL[p][1]}" for p in OPTIONAL if p in fresh]
    notes += [f"the source's {OPTIONAL[p][0][4:]} {OPTIONAL[p][2]}" for p in OPTIONAL if p in left_out]
    return "; ".join(notes) or None
