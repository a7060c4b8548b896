"""A run is never lost: SIGKILL at three moments, SIGTERM, exact resume, NaN, full disk, locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import write_config, write_images

from ddpm_tf.config import load_config
from ddpm_tf.runs import RunDir, RunLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

FAST = {"model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [8], "norm_groups": 4},
        "train": {"batch_size": 2, "epochs": 6, "deterministic": True, "seed": 11},
        "run": {"checkpoint_every": 1, "preview_every": 0}}


@pytest.fixture
def project(tmp_path):
    write_images(tmp_path / "images", 30)

    def make(name, **extra):
        body = {k: dict(v) for k, v in FAST.items()}
        for section, values in extra.items():
            body.setdefault(section, {}).update(values)
        body.setdefault("run", {})["dir"] = str(tmp_path / "runs" / name)
        body.setdefault("data", {})["dir"] = str(tmp_path / "images")
        return write_config(tmp_path / f"{name}.yaml", body), RunDir(tmp_path / "runs" / name)

    return make


def start(cfg, env_extra=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(predicate, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def leftovers(run: RunDir):
    return [p for p in run.path.rglob("*") if ".tmp-" in p.name or "_temp" in p.name or p.name == ".lock"]


def latest_step(run: RunDir):
    import tensorflow as tf

    path = tf.train.latest_checkpoint(str(run.checkpoints))
    return int(path.rsplit("-", 1)[1]) if path else None


def test_kill_terminate_and_resume_exactly(project):
    cfg, run = project("interrupted")
    total_steps = 6 * 15

    # 1. SIGKILL while starting, before any checkpoint exists.
    proc = start(cfg)
    wait_for(lambda: (run.path / ".lock").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2. SIGKILL between checkpoints (the stale lock of the dead process is taken over).
    proc = start(cfg)
    wait_for(lambda: len(run.export_paths()) >= 1, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_before = latest_step(run)
    assert step_before is not None and step_before % 15 == 0

    # 3. SIGKILL in the middle of a save: the checkpoint is written, its export is not yet.
    proc = start(cfg, {"DDPM_TF_TEST_PAUSE_IN_SAVE": "20"})
    wait_for(lambda: (latest_step(run) or 0) > step_before, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert killed_at not in run.export_paths()

    # 4. SIGTERM: finish the step, save (mid-epoch), exit 143 with how to resume.
    proc = start(cfg)
    wait_for(lambda: max(run.export_paths(), default=0) > killed_at, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "SIGTERM" in out and "Resume" in out
    assert f"resuming {run.path} from step {killed_at}" in out  # the killed save's checkpoint loaded
    assert not leftovers(run)
    termed_at = latest_step(run)
    assert termed_at in run.export_paths()

    # 5. Resume to the end.
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg)],
                            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from step {termed_at}" in result.stdout
    assert latest_step(run) == total_steps and not leftovers(run)

    # An uninterrupted run of the same length ends with bit-identical weights.
    ref_cfg, ref_run = project("uninterrupted")
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(ref_cfg)],
                            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(run.export_paths()[total_steps]) as a, np.load(ref_run.export_paths()[total_steps]) as b:
        keys = [k for k in a.files if k != "__meta__"]
        assert keys and sorted(keys) == sorted(k for k in b.files if k != "__meta__")
        for k in keys:
            assert np.array_equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(project, monkeypatch):
    from ddpm_tf import diffusion
    from ddpm_tf.compat import tf
    from ddpm_tf.errors import TrainingStopped
    from ddpm_tf.train import train

    original = diffusion.DiffusionModel.diffusion_loss

    def poisoned(self, x0, labels=None, training=True, **given):  # train_step now passes t, eps, augment
        loss = original(self, x0, labels, training, **given)
        nan_after = tf.cast(self.optimizer.iterations >= 20, tf.float32) * np.float32("nan")
        return loss + tf.where(self.optimizer.iterations >= 20, nan_after, 0.0)

    monkeypatch.setattr(diffusion.DiffusionModel, "diffusion_loss", poisoned)
    cfg_path, run = project("nan", train={"deterministic": False})
    with pytest.raises(TrainingStopped) as info:
        train(load_config(cfg_path))
    message = str(info.value)
    assert "step 21" in message and "learning rate" in message
    assert latest_step(run) == 15 and max(run.export_paths()) == 15
    assert not (run.path / ".lock").exists()


def test_full_disk_keeps_the_previous_checkpoint(project, monkeypatch):
    import tensorflow as tf

    from ddpm_tf.errors import TrainingStopped
    from ddpm_tf.train import train

    real_save = tf.train.CheckpointManager.save
    calls = []

    def save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    cfg_path, run = project("full", train={"deterministic": False})
    with pytest.raises(TrainingStopped, match="No space left.*previous checkpoint"):
        train(load_config(cfg_path))
    assert latest_step(run) == 15 and sorted(run.export_paths()) == [15]


def test_a_locked_run_is_refused_and_a_stale_lock_taken_over(project):
    from ddpm_tf.errors import RunError

    cfg_path, run = project("locked", train={"epochs": 1, "deterministic": False})
    run.path.mkdir(parents=True)
    lock = RunLock(run)
    lock.acquire()  # held by this (live) process
    other = RunLock(run)
    with pytest.raises(RunError, match=f"being trained by process {os.getpid()}"):
        other.acquire()
    lock.release()
    # A lock left by a process that no longer exists.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run.path / ".lock").write_text(f"pid: {dead.stdout.strip()}\nhost: {socket.gethostname()}\n", encoding="utf-8")
    note = RunLock(run).acquire()
    assert note and "stale" in note


def test_partial_files_are_removed(project):
    _, run = project("partial")
    run.claim()
    (run.checkpoints / "ckpt-7_temp").mkdir(parents=True)
    (run.checkpoints / "ckpt-7_temp" / "part-00000-of-00001.index").write_bytes(b"x")
    run.exports.mkdir()
    (run.exports / ".ema-00000007.npz.tmp-999999999").write_bytes(b"x")  # no process has that id
    (run.exports / "ema-00000005.npz").write_bytes(b"kept")
    removed = run.remove_partial_files()
    assert len(removed) == 3 and (run.exports / "ema-00000005.npz").exists()
    assert not (run.checkpoints / "ckpt-7_temp").exists()


def test_a_resumed_run_with_augmentation_equals_an_uninterrupted_one(project):
    """train.augment_p: the transforms and their conditioning are a function of (seed, epoch, index), so a run
    stopped mid-epoch and resumed ends bit-identical to one that never stopped (train.deterministic)."""
    cfg, run = project("augmented", train={"augment_p": 0.5, "epochs": 3})
    proc = start(cfg)
    wait_for(lambda: len(run.export_paths()) >= 1, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "augmentation: each of x-flip" in out
    stopped_at = latest_step(run)
    assert 0 < stopped_at < 45
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and f"from step {stopped_at}" in result.stdout, result.stdout + result.stderr
    ref_cfg, ref_run = project("augmented-uninterrupted", train={"augment_p": 0.5, "epochs": 3})
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(ref_cfg)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(run.export_paths()[45]) as a, np.load(ref_run.export_paths()[45]) as b:
        keys = [k for k in a.files if k != "__meta__"]
        assert "augment_emb/kernel" in keys and np.abs(a["augment_emb/kernel"]).max() > 0  # it learned
        assert sorted(keys) == sorted(k for k in b.files if k != "__meta__")
        for k in keys:
            assert np.array_equal(a[k], b[k]), k
    # Turning augmentation off changes the network: refused with the key named, nothing written.
    before = sorted(p.name for p in run.checkpoints.iterdir())
    off = project("augmented", train={"augment_p": 0.0, "epochs": 4})[0]
    result = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(off)],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.augment_p was 0.5 in this run, the new config says 0" in result.stderr
    assert sorted(p.name for p in run.checkpoints.iterdir()) == before


def test_a_resume_may_turn_recompute_on_but_not_change_the_network(project):
    """model.recompute changes no weight (gradient checkpointing): a resume may toggle it; any other model key is
    still refused, naming it, with nothing written."""
    from ddpm_tf.config import load_config
    from ddpm_tf.errors import ConfigError
    from ddpm_tf.train import train

    cfg_path, run = project("recompute", train={"epochs": 1, "deterministic": False})
    train(load_config(cfg_path), echo=lambda m: None, log=lambda m: None)
    first = latest_step(run)
    lines = []
    train(load_config(cfg_path, ["model.recompute=true", "train.epochs=2"]), echo=lines.append,
          log=lambda m: None)
    assert any(f"from step {first}" in line for line in lines), lines
    assert latest_step(run) == 2 * first
    before = sorted(p.name for p in run.checkpoints.iterdir())
    with pytest.raises(ConfigError, match="model.base_channels was 8 in this run, the new config says 16"):
        train(load_config(cfg_path, ["model.base_channels=16", "train.epochs=3"]), echo=lambda m: None,
              log=lambda m: None)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == before
