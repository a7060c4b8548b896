"""The stall watchdog: a stalled thread's stack after the timeout, silence while steps finish, one warning per
timeout, nothing left behind on exit; end to end in `ddpm train` and `ddpm sample` with an injected stall.

Short timeouts, but no assertion on how long anything took: the tests wait for the report and check its text.
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddpm_tf.config import ConfigError, load_config
from ddpm_tf.watchdog import Watchdog

FOOTER = "please file an issue"


class Captured(io.StringIO):
    """A stream without a file descriptor (like CliRunner's) that signals each finished report."""

    def __init__(self):
        super().__init__()
        self.reports = threading.Semaphore(0)

    def write(self, text):
        n = super().write(text)
        if FOOTER in text:
            self.reports.release()
        return n


def stalled_function(release: threading.Event) -> None:
    release.wait(60)


def stall_and_report(dog: Watchdog, wait_for_report) -> float:
    """Beat once, stall a named worker thread until the first report is written; the seconds it took."""
    release = threading.Event()
    t0 = time.monotonic()
    with dog:
        dog.beat()
        worker = threading.Thread(target=stalled_function, args=(release,), name="stalled-worker")
        worker.start()
        try:
            assert wait_for_report(), "no stall report within 60 s"
        finally:
            release.set()
            worker.join()
    return time.monotonic() - t0


def test_a_stall_is_reported_with_the_stalled_threads_stack():
    out = Captured()
    dog = Watchdog(0.3, "train", "step", stream=out, start=11)
    elapsed = stall_and_report(dog, lambda: out.reports.acquire(timeout=60))
    text = out.getvalue()
    assert "warning: train: no step finished for" in text
    assert "(last at step 12)" in text
    assert "stalled-worker" in text and "stalled_function" in text and "release.wait(60)" in text
    assert "gdb -p" in text and "thread apply all bt" in text and "py-spy dump --native --pid" in text
    assert "train.precision=float32" in text and "run.stall_timeout" in text and FOOTER in text
    assert 1 <= dog.warnings <= elapsed / 0.3  # at most one per full timeout, however slow the machine
    assert text.count("warning: train:") == dog.warnings


def test_a_real_file_gets_faulthandlers_dump(tmp_path):
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as f:
        dog = Watchdog(0.3, "sample", "sampler step", stream=f)

        def reported():
            for _ in range(600):
                if dog.warnings and FOOTER in (tmp_path / "stderr.txt").read_text(encoding="utf-8"):
                    return True
                time.sleep(0.1)
            return False

        stall_and_report(dog, reported)
    text = (tmp_path / "stderr.txt").read_text(encoding="utf-8")
    assert "warning: sample: no sampler step finished for" in text
    assert "(most recent call first)" in text  # faulthandler's format
    assert "in stalled_function" in text
    assert "--stall-timeout" in text


def test_no_report_while_beats_keep_coming():
    out = Captured()
    with Watchdog(2.0, "train", stream=out, first_timeout=2.0) as dog:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:  # longer than the timeout: it counts from the last beat
            dog.beat()
            time.sleep(0.01)
    assert dog.warnings == 0 and out.getvalue() == ""


def test_one_warning_per_timeout_and_a_longer_first_allowance():
    now = [0.0]
    out = Captured()
    dog = Watchdog(1.0, "train", stream=out, clock=lambda: now[0])  # not entered: drive its check by hand
    assert dog.first_timeout == 4.0
    assert dog.tick(3.9) == pytest.approx(0.1) and dog.warnings == 0  # the first step compiles
    dog.tick(4.0)
    assert dog.warnings == 1 and "since the start" in out.getvalue()
    for t in (4.1, 4.5, 4.99):
        dog.tick(t)
    assert dog.warnings == 1  # not a flood
    dog.tick(5.0)
    assert dog.warnings == 2
    now[0] = 5.2
    dog.beat()
    assert dog.tick(5.3) == pytest.approx(0.9) and dog.warnings == 2  # a beat resets the clock
    dog.tick(6.3)
    assert dog.warnings == 3 and out.getvalue().rstrip().split("warning: ")[-1].startswith(
        "train: no step finished for 1.1 s (last at step 1)")


def test_stops_on_exit_and_zero_is_off():
    out = Captured()
    with Watchdog(0.2, "train", stream=out) as dog:
        assert any(t.name == "ddpm-watchdog-train" for t in threading.enumerate())
    assert not any(t.name.startswith("ddpm-watchdog") for t in threading.enumerate())
    time.sleep(1.0)  # well past the first allowance: a thread left behind would have written by now
    assert out.getvalue() == "" and dog.warnings == 0
    with Watchdog(0, "train", stream=out) as off:
        off.beat()
        assert not any(t.name.startswith("ddpm-watchdog") for t in threading.enumerate())


def test_stall_timeout_config_key():
    assert load_config(None).run.stall_timeout == 900.0
    assert load_config(None, ["run.stall_timeout=0"]).run.stall_timeout == 0.0
    assert load_config(None, ["run.stall_timeout=0.5"]).run.stall_timeout == 0.5
    for bad, why in (("-1", "out of range"), ("soon", "wrong type"), ("true", "wrong type"),
                     ("1e9", "out of range")):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"run.stall_timeout={bad}"])
        message = str(info.value)
        assert "run.stall_timeout" in message and why in message and "[0.0, 604800.0]" in message


def test_sample_seeds_beats_after_every_chunk():
    from ddpm_tf.samplers import Sampler, sample_seeds

    class FakeSampler:
        num_steps, num_labels = 10, 0
        label_rows = Sampler.label_rows  # the real label check: an unconditional sampler gets (B, 0) rows

        def __call__(self, seeds, image_shape, progress=None, labels=None):
            assert labels.shape == (len(seeds), 0)
            for _ in range(2):
                progress(5)
            return np.zeros((len(seeds), *image_shape), np.float32)

    class Bar:
        updates = []

        def __init__(self, total, desc=None):
            self.total = total

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    beats = []
    images = sample_seeds(FakeSampler(), np.arange(5), (4, 4, 1), 2, Bar, beat=beats.append)
    assert images.shape == (5, 4, 4, 1)
    assert beats == [5] * 6 and Bar.updates == [5] * 6
    assert len(sample_seeds(FakeSampler(), np.arange(3), (4, 4, 1), 2)) == 3  # neither bar nor beat


def blocks(output: str) -> list[str]:
    """The watchdog's reports in a command's output."""
    return ["warning: " + b for b in output.split("\nwarning: ")[1:] if b.startswith(("train: no", "sample: no"))]


def test_train_reports_a_stalled_step_and_still_finishes(tiny_project, monkeypatch):
    from ddpm_tf import callbacks
    from ddpm_tf.cli import main

    original = callbacks.Progress.on_train_batch_end
    calls = []

    def stuck_in_a_callback(self, batch, logs=None):
        calls.append(batch)
        if len(calls) == 2:  # after the watchdog heard of step 2: the graph is traced by then
            time.sleep(3.0)
        return original(self, batch, logs)

    monkeypatch.setattr(callbacks.Progress, "on_train_batch_end", stuck_in_a_callback)
    cfg, run_dir = tiny_project
    result = CliRunner().invoke(main, ["train", "--config", str(cfg), "--set", "run.stall_timeout=0.5",
                                       "--set", "run.preview_every=0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "done:" in result.output
    stuck = [b for b in blocks(result.output) if "stuck_in_a_callback" in b]
    assert stuck, result.output
    assert "train: no step finished for" in stuck[0] and "(last at step 2)" in stuck[0]
    assert "time.sleep(3.0)" in stuck[0] and "MainThread" in stuck[0]
    assert not any(t.name.startswith("ddpm-watchdog") for t in threading.enumerate())


def test_sample_reports_a_stalled_chunk_with_the_option(tmp_path, monkeypatch):
    from ddpm_tf import samplers
    from ddpm_tf.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "export-keras3", run_dir)
    original = samplers.Sampler.__call__

    def with_a_stall(self, seeds, image_shape, progress=None, **kwargs):
        chunks = []

        def stuck_between_chunks(n):
            progress(n)
            chunks.append(n)
            if len(chunks) == 2:
                time.sleep(2.0)

        return original(self, seeds, image_shape, progress=stuck_between_chunks, **kwargs)

    monkeypatch.setattr(samplers.Sampler, "__call__", with_a_stall)
    result = CliRunner().invoke(main, ["sample", "--run", str(run_dir), "--n", "2", "--sampler", "ddim",
                                       "--steps", "4", "--stall-timeout", "0.3", "--out", str(tmp_path / "g.png")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.png").is_file()
    stuck = [b for b in blocks(result.output) if "stuck_between_chunks" in b]
    assert stuck, result.output
    assert "sample: no sampler step finished for" in stuck[0] and "--stall-timeout" in stuck[0]
    assert not any(t.name.startswith("ddpm-watchdog") for t in threading.enumerate())
