"""A stall watchdog: when no unit of progress (a train step, a sampler chunk) finishes for too long, say
where every Python thread is and what to do about it. TF-free, so it also watches TensorFlow's import.

    with Watchdog(900, "train", "step") as dog:
        for batch in data:
            step(batch)
            dog.beat()

The first unit gets `first_timeout` (FIRST_FACTOR x timeout unless given): it traces and compiles the
graph, which can legitimately take minutes. Later units get `timeout`, counted from the previous beat.
A stall is reported once, then again after every further `timeout` without a beat (the stacks show
whether it moved), never in a flood. The watchdog only reports: it never stops the process.
"""

from __future__ import annotations

import faulthandler
import io
import os
import sys
import threading
import time
import traceback

FIRST_FACTOR = 4  # the first unit traces and compiles: it gets FIRST_FACTOR x the timeout

# What to try, by `what`: the run's knobs differ between training and sampling.
HINTS = {
    "train": ("under mixed precision (train.precision: mixed_float16 or mixed_bfloat16): retry with "
              "`--set train.precision=float32` (in a new run.dir, or with --restart);",
              "with XLA (train.jit_compile auto or true): retry with `--set train.jit_compile=false`;",
              "slow but not stuck (a huge first step, a long train.eval_every evaluation, a slow disk): raise "
              "run.stall_timeout, or set it to 0 to turn this warning off;"),
    "sample": ("a run trained with train.precision mixed_float16 or mixed_bfloat16 samples in that precision; "
               "`ddpm sample --batch-size 1` shows whether it is memory;",
               "slow but not stuck: raise --stall-timeout (the run's run.stall_timeout by default), 0 turns it off;"),
}


def _seconds(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


class Watchdog:
    """Warns on `stream` (sys.stderr at the time) with every thread's stack when `beat` stops coming.

    `timeout` 0 turns it off (a no-op context manager). `start` is the position before the first beat
    (a resumed run's step); each `beat(n)` advances it by n. Use it as a context manager: the thread starts
    on entry and is stopped and joined on exit, so nothing is printed after the block ends."""

    def __init__(self, timeout: float, what: str, unit: str = "step", *, first_timeout: float | None = None,
                 start: int = 0, stream=None, clock=time.monotonic):
        self.timeout = float(timeout)
        self.first_timeout = float(first_timeout if first_timeout is not None else FIRST_FACTOR * self.timeout)
        self.what, self.unit, self.stream, self._clock = what, unit, stream, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats, self._position = 0, start
        self._last = clock()
        self._warned_at: float | None = None
        self.warnings = 0

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def beat(self, n: int = 1) -> None:
        """A unit of progress (n steps of it) finished."""
        with self._lock:
            self._beats += 1
            self._position += n
            self._last = self._clock()
            self._warned_at = None

    def __enter__(self) -> Watchdog:
        if self.enabled:
            with self._lock:
                self._last, self._warned_at = self._clock(), None
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"ddpm-watchdog-{self.what}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop and join the thread; a report being written is finished first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        wait = self.tick(self._clock())
        while not self._stop.wait(wait):
            wait = self.tick(self._clock())

    def _due(self) -> float:
        if self._warned_at is not None:  # warned already: again only after another full timeout
            return self._warned_at + self.timeout
        return self._last + (self.timeout if self._beats else self.first_timeout)

    def tick(self, now: float) -> float:
        """Warn if a stall is due at `now`; the seconds until the next check. (The thread's one step.)"""
        with self._lock:
            due = self._due()
            if now < due:
                return due - now
            self._warned_at = now
            idle, beats, position = now - self._last, self._beats, self._position
        self.warnings += 1
        self._report(idle, beats, position)
        return self.timeout

    def _report(self, idle: float, beats: int, position: int) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        if beats:
            head = f"{self.what}: no {self.unit} finished for {_seconds(idle)} s (last at {self.unit} {position})"
        else:
            head = (f"{self.what}: no {self.unit} finished for {_seconds(idle)} s since the start (the first "
                    f"{self.unit} traces and compiles the graph; it is allowed {_seconds(self.first_timeout)} s)")
        names = ", ".join(f"0x{t.ident:016x} {t.name}" for t in threading.enumerate() if t.ident)
        pid = os.getpid()
        stream.write(f"\nwarning: {head}. Still waiting; the process is not stopped.\n"
                     f"Python stacks of every thread (threads: {names}):\n")
        _dump_stacks(stream)
        lines = [f"This warning repeats every {_seconds(self.timeout)} s until a {self.unit} finishes. If it is stuck:",
                 "  - where the native (C++) code is: `gdb -p {pid} -batch -ex 'thread apply all bt'` or "
                 "`py-spy dump --native --pid {pid}`;".format(pid=pid),
                 *(f"  - {hint}" for hint in HINTS.get(self.what, ())),
                 "  - please file an issue with this whole output, the config (RUN/config.yaml) and "
                 "`ddpm --version`."]
        stream.write("\n".join(lines) + "\n")
        stream.flush()


def _dump_stacks(stream) -> None:
    """faulthandler's dump of all threads where `stream` is a real file, else the same from Python's
    frames (faulthandler writes to a file descriptor, which a captured stream, e.g. Click's CliRunner's
    BytesIO, does not have)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is not None:
        stream.flush()  # faulthandler writes to the descriptor, under Python's buffer
        faulthandler.dump_traceback(file=stream, all_threads=True)
        return
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue  # this watchdog
        stream.write(f"Thread 0x{ident:016x} {names.get(ident, '?')} (most recent call last):\n")
        stream.write("".join(traceback.format_stack(frame)) + "\n")
