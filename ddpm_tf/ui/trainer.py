"""The Train tab's trainer: `ddpm train` started as its own process (it outlives the page, which can be closed
and reopened), its live step, loss and ETA read back from the run's progress.json, and Stop as SIGTERM, on
which the trainer saves a checkpoint and exits (resumable). The run's lock is the truth about who trains.
TF-free: TensorFlow runs in the trainer process only."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError, RunError
from ..runs import RunDir, RunLock
from .roots import Roots

LOG_FOLDER = ".ddpm_ui"  # under the runs folder (not a run: `ddpm runs` skips it): one log per trainer
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
START_TIMEOUT = 300.0  # seconds for a trainer to take its run's lock (TensorFlow's import on a busy machine)


def parse_overrides(text: str) -> list[str]:
    """One `section.key=value` per line (blank lines and # comments skipped) -> the `--set` values."""
    sets = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.epochs=10")
    return sets


def _eta(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"


class Trainers:
    """The trainers started from this page (to reap them), and what any run's trainer is doing."""

    def __init__(self, roots: Roots, python: str = sys.executable):
        self.roots, self.python = roots, python
        self.processes: dict[Path, subprocess.Popen] = {}

    def log_path(self, run_name: str) -> Path:
        return self.roots.runs / LOG_FOLDER / f"{run_name}.log"

    def plan(self, config: str, run_name: str, overrides: str = "") -> tuple[Path, Path, list[str]]:
        """(config file, run folder, --set values) of a training request, checked: a config of the configs
        folder, a plain run name (the run goes in the runs folder), overrides that make a valid config."""
        from ..config import load_config

        config_path = self.roots.check(config if "/" in str(config) else self.roots.configs / str(config), "config")
        if config_path.parent != self.roots.configs:
            raise ConfigError(f"config {config}: choose a config of {self.roots.configs}")
        run_name = (run_name or "").strip() or config_path.stem
        if not RUN_NAME_RE.match(run_name):
            raise ConfigError(f"run name {run_name!r}: use letters, digits, '.', '_' and '-' (a folder under "
                              f"{self.roots.runs})")
        run_path = self.roots.runs / run_name
        sets = [*parse_overrides(overrides), f"run.dir={run_path}"]
        load_config(config_path, sets)  # a bad override is one line here, not a dead process later
        return config_path, run_path, sets

    def start(self, config: str, run_name: str, overrides: str = "", timeout: float = START_TIMEOUT) -> dict:
        """Start `ddpm train` on a run and return its status once it holds the run's lock. RunError with the
        lock's message when the run is being trained, or with the trainer's own error when it stops first."""
        config_path, run_path, sets = self.plan(config, run_name, overrides)
        run = RunDir(run_path)
        lock = RunLock(run)
        owner = lock.live_owner()
        if owner is not None:
            raise RunError(lock.busy_message(owner))
        log = self.log_path(run_path.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [self.python, "-m", "ddpm_tf.cli", "train", "--config", str(config_path)]
        for item in sets:
            command += ["--set", item]
        with open(log, "wb") as out:
            # Its own session: Ctrl-C on the page (the terminal's process group) does not reach the trainer.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes[run_path] = process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RunError(self._failure(run_path.name, process.returncode))
            if (lock.owner() or {}).get("pid") == process.pid:
                return self.status(run_path.name)
            time.sleep(0.2)
        return self.status(run_path.name)  # still starting: the status says so

    def _failure(self, run_name: str, code: int) -> str:
        lines = self.log_tail(run_name, 40).splitlines()
        errors = [line for line in lines if line.startswith("Error: ")]
        return errors[-1][len("Error: "):] if errors else f"ddpm train exited with code {code}: " + \
            (lines[-1] if lines else "no output")

    def log_tail(self, run_name: str, lines: int = 12) -> str:
        try:
            text = self.log_path(run_name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        # tqdm redraws its bar with carriage returns: keep the last state of each line
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])

    def stop(self, run_name: str) -> str:
        """SIGTERM to the process holding the run's lock (on this host): it saves a checkpoint and exits."""
        run = RunDir(self.roots.run(run_name))
        owner = RunLock(run).live_owner()
        if owner is None:
            raise RunError(f"{run.path} is not being trained")
        if owner.get("host") != socket.gethostname():
            raise RunError(f"{run.path} is trained on {owner.get('host')}: stop it there")
        os.kill(owner["pid"], signal.SIGTERM)
        return f"sent SIGTERM to process {owner['pid']}: it saves a checkpoint and stops (resume with Start)"

    def status(self, run_name: str) -> dict:
        """{training, pid, progress (progress.json or None), text, preview (path or None), log}."""
        for process in self.processes.values():
            process.poll()  # reap a finished trainer, so its pid is not taken for a live one
        run = RunDir(self.roots.runs / run_name)
        owner = RunLock(run).live_owner() if run.path.is_dir() else None
        try:
            progress = json.loads(run.progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            progress = None
        preview = run.previews / "latest.png"
        return {"training": owner is not None, "pid": owner.get("pid") if owner else None, "progress": progress,
                "text": self.describe(owner, progress), "preview": preview if preview.is_file() else None,
                "log": self.log_tail(run_name)}

    @staticmethod
    def describe(owner: dict | None, progress: dict | None) -> str:
        """One line: training or not, step of total, loss, images/s, ETA."""
        state = f"training (process {owner['pid']})" if owner else "not training"
        if not progress:
            return state + (", starting" if owner else "")
        parts = [state, f"step {progress.get('step')} / {progress.get('total_steps')}"
                 + ("" if owner else f" ({progress.get('status')})")]
        if progress.get("loss") is not None:
            parts.append(f"loss {progress['loss']:.4f}")
        if owner:
            parts += [f"{progress.get('images_per_s') or 0:g} img/s", f"ETA {_eta(progress.get('eta_seconds'))}"]
        return " · ".join(parts)
