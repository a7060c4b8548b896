"""Every user-facing error of ddpm_tf, TF-free: the CLI turns any `UserError` into one line and an exit code.

A message names the file, key or value and what was expected; no traceback is shown for these.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a person can act on; `exit_code` is what the command exits with."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A user error in a config file or override: the message names the file, the key and what is allowed."""

    exit_code = 2


class DataError(UserError, ValueError):
    """The data folder cannot be used at all (missing, or no usable image), or one given image cannot be."""


class LabelError(DataError):
    """A label asked for that the data or the run does not have (an unknown class or tag, an empty tag list),
    or a stored label set that cannot be read; exit 2, like a bad option."""

    exit_code = 2


class RunError(UserError, ValueError):
    """A run directory that cannot be used for what was asked (no config, no weights, ...)."""


class OutputError(UserError, ValueError):
    """An output path that cannot or must not be written; the message names it and what to do."""


class PathError(UserError, ValueError):
    """A path the web page must not read or serve: outside its roots (the runs folder, the configs folder and
    the data folders of those runs and configs), through `..`, or a symlink out of them; exit 2."""

    exit_code = 2


class MetricError(UserError, ValueError):
    """The features cannot give this metric (too few images, mismatched dimensions, NaN)."""


class EvalError(UserError, ValueError):
    """Evaluation cannot run as asked; the message names the file or setting and what was expected."""


class TrainingStopped(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that cannot be written); the message says why."""


class Interrupted(RuntimeError):
    """Training stopped cleanly on a signal, after saving; `signal_name` is 'SIGTERM' or 'Ctrl-C'."""

    @property
    def exit_code(self) -> int:
        return 143 if str(self) == "SIGTERM" else 130  # 128 + signal number, as a shell reports it
