"""Training on tf.distribute (train.distribute): two logical CPU devices under MirroredStrategy make the same
update as one device at the same global batch; two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy
from TF_CONFIG) train one run whose files only the chief writes, which then resumes on one device; a killed
worker leaves the chief's newest checkpoint loadable.

Logical devices and the multi-worker runtime are set up once per process before TensorFlow starts, so these
tests run their training in subprocesses."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_config, write_images

REPO = Path(__file__).resolve().parents[1]

# One device and two logical devices, same global batch (8, 8, then an uneven 7: 4 + 3 on two replicas), same
# seed: the losses and the weights after three Adam steps. Summation order differs (two partial sums and an
# all-reduce against one sum), so equal within float32 rounding: 1e-6 on weights of order 1. Mixed precision
# rounds activations to 11 bits (float16, with its loss scaling), differently for other batch shapes: 1e-2, which
# still tells a right update (steps of lr = 1e-3 in the same direction) from a wrong one (the update doubled,
# halved or skipped moves the weights by 1e-3 or more against the 1e-3 of the update).
_MIRROR_CHECK = r"""
import json, sys
import numpy as np
from ddpm_tf import distribute
distribute.split_cpu(2)
from ddpm_tf.compat import tf, variable_key
from ddpm_tf.config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from ddpm_tf.diffusion import build_diffusion_model

MODEL = ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    dropout=0.0, norm_groups=4)
data = [np.random.default_rng(0).uniform(-1, 1, (n, 16, 16, 1)).astype(np.float32) for n in (8, 8, 7)]

PLACEMENTS = {mode: distribute.make_placement(mode) for mode in ("none", "mirrored")}  # one strategy each, reused

def build(mode, batch_size, accumulate, clip, precision):
    placement = PLACEMENTS[mode]
    cfg = Config(data=DataConfig(image_size=16, channels=1), model=MODEL, diffusion=DiffusionConfig(timesteps=100),
                 train=TrainConfig(batch_size=batch_size, accumulate=accumulate, seed=3, grad_clip=clip,
                                   learning_rate=1e-3, jit_compile="true" if mode == "mirrored" else "false",
                                   precision=precision))
    with placement.strategy.scope():
        return placement, *build_diffusion_model(cfg, seed=3)

def fit(model):
    ds = tf.data.Dataset.from_generator(lambda: iter(data), output_signature=tf.TensorSpec([None, 16, 16, 1]))
    return model.fit(ds, epochs=1, steps_per_epoch=len(data), verbose=0, shuffle=False).history["loss"]

def weights(net):
    return {variable_key(v): v.numpy() for v in net.weights}

out = []
for clip, accumulate, precision in [json.loads(sys.argv[1])]:
    _, one, _ = build("none", 8, 1, clip, precision)
    placement, two, xla = build("mirrored", 4 // accumulate, accumulate, clip, precision)
    case = {"clip": clip, "accumulate": accumulate, "precision": precision, "replicas": placement.replicas,
            "xla": xla, "loss": [fit(one), fit(two)],
            "steps": [int(m.optimizer.iterations.numpy()) for m in (one, two)] + [int(two.ema_updates.numpy())]}
    for name in ("net", "ema_net"):
        a, b = weights(getattr(one, name)), weights(getattr(two, name))
        case[name] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    case["moved"] = max(float(np.max(np.abs(v))) for v in weights(one.net).values())
    out.append(case)
print("RESULT " + json.dumps(out))
"""


def _python(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("clip, accumulate, precision", [(1.0, 1, "float32"), (0.0, 2, "float32"),
                                                         (1.0, 2, "mixed_float16")])
def test_two_mirrored_devices_make_the_update_of_one_device(clip, accumulate, precision):
    done = _python(_MIRROR_CHECK, json.dumps([clip, accumulate, precision]), timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert [c["precision"] for c in cases] == [precision]
    for case in cases:
        # XLA compiles no collective for CPU devices: two CPU replicas run as plain graphs whatever jit_compile says.
        assert case["replicas"] == 2 and case["steps"] == [3, 3, 3] and case["xla"] is False, case
        tol = 1e-6 if case["precision"] == "float32" else 1e-2
        np.testing.assert_allclose(case["loss"][1], case["loss"][0], rtol=tol)
        assert case["net"] < tol and case["ema_net"] < tol, case
        assert case["moved"] > 0.1  # the weights are real ones, not zeros that agree trivially


def test_a_resume_at_another_global_batch_continues_at_the_same_image():
    from ddpm_tf.callbacks import RunState
    from ddpm_tf.data.pipeline import make_dataset

    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * 20
    saved = RunState(10, 4, "float32")  # 3 steps per epoch at a global batch of 4 (two replicas of 2, say)
    saved.global_batch.assign(4)
    saved.batch.assign(1)  # one batch of epoch 0 done: 4 images
    resumed = RunState(10, 3, "float32")  # now 3 per step: 4 steps per epoch
    for v, w in ((resumed.epoch, saved.epoch), (resumed.batch, saved.batch), (resumed.global_batch, saved.global_batch)):
        v.assign(w)
    resumed.rebase()
    # 6 images left in the epoch make 2 batches of 3, numbered 2 and 3 of 4, so the epoch ends where it should.
    assert resumed.skip_images == 4 and resumed.position() == (0, 2) and int(resumed.global_batch.numpy()) == 3
    assert resumed.images_in_next_batch() == 3

    def values(ds, n):
        return [np.rint((b.numpy().ravel() + 1) * 127.5).astype(int).tolist() for b in ds.take(n)]

    whole = sum(values(make_dataset(images, 10, seed=5, flip=False), 1), [])  # epoch 0's order
    rest = values(make_dataset(images, 3, seed=5, flip=False, skip_images=4), 3)
    assert sum(rest[:2], []) == whole[4:]  # the rest of epoch 0, nothing repeated or lost
    epoch1 = sum(values(make_dataset(images, 10, seed=5, start_epoch=1, flip=False), 1), [])
    assert rest[2] == epoch1[:3]  # then epoch 1 from its start
    # A checkpoint from before the global batch was recorded (0) counts its batches in this run's batch.
    old = RunState(10, 4, "float32")
    old.batch.assign(2)
    old.rebase()
    assert old.skip_images == 8 and old.position() == (0, 2)
    # The last batch of a resumed, uneven epoch: 10 - 4 = 6 left at 4 per step is 4, then 2.
    uneven = RunState(10, 4, "float32")
    uneven.global_batch.assign(2)
    uneven.batch.assign(2)
    uneven.rebase()
    assert uneven.skip_images == 4 and uneven.position() == (0, 1)
    assert uneven.images_in_next_batch() == 4
    uneven.batch.assign(2)
    assert uneven.images_in_next_batch() == 2


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _cluster(tmp_path: Path, epochs: int, images: int = 12):
    """(config, run dir, the env of each of two workers): a tiny labelled-free project on one shared folder."""
    write_images(tmp_path / "images", images)
    run_dir = tmp_path / "runs" / "multi"
    cfg = write_config(tmp_path / "multi.yaml", {
        "run": {"dir": str(run_dir), "preview_every": 0, "checkpoint_every": 1},
        "data": {"dir": str(tmp_path / "images")},
        "train": {"epochs": epochs, "batch_size": 2, "distribute": "multi_worker", "jit_compile": "false"}})
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = []
    for index in range(2):
        scratch = tmp_path / f"tmp-{index}"  # each worker's TMPDIR: where its scratch folder goes
        scratch.mkdir()
        envs.append({**os.environ, "TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": "",
                     "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
    return cfg, run_dir, envs


def _start(cfg: Path, env: dict, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg), *extra],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_two_workers_on_localhost_write_one_run_which_resumes_on_one_device(tmp_path):
    cfg, run_dir, envs = _cluster(tmp_path, epochs=2)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [_start(cfg, env, log) for env, log in zip(envs, logs)]
    try:
        codes = [p.wait(timeout=500) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    texts = [log.read_text(encoding="utf-8") for log in logs]
    assert codes == [0, 0], "\n----\n".join(t[-3000:] for t in texts)
    # 12 images, 2 per replica on 2 replicas: a global batch of 4, 3 steps per epoch, 6 steps in all.
    assert "multi_worker, 2 workers, 2 replicas, global batch 4" in texts[0] and "this process is the chief" in texts[0]
    assert "this process is the worker 1" in texts[1] and "the chief wrote" in texts[1]
    # The shared cache prepared once, by the chief; the worker, started with it, waited and found it fresh.
    assert "prepared 12 files" in texts[0] and "prepared" not in texts[1]
    assert "done:" in texts[0] and "step 6" in texts[0]
    files = _files(run_dir)
    assert "checkpoints/ckpt-6.index" in files and "exports/ema-00000006.npz" in files, files
    assert not (run_dir / ".lock").exists()
    # Only the chief's files: no worker scratch folder anywhere, nothing left in the workers' TMPDIRs.
    assert not any("ddpm-worker" in f for f in files), files
    assert [list((tmp_path / f"tmp-{i}").iterdir()) for i in range(2)] == [[], []]
    rows = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3  # a header and one row per epoch, written once

    # The same run on one device, one more epoch: global batch 2 now, 6 steps per epoch.
    single = [sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg), "--set", "train.distribute=none",
              "--set", "train.epochs=3"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run(single, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming" in done.stdout and "from step 6 (epoch 2)" in done.stdout, done.stdout
    assert "devices: one" in done.stdout and "global batch 2" in done.stdout
    assert "done:" in done.stdout and "step 12" in done.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["train"]["distribute"] == "none"


def test_a_killed_worker_leaves_the_chiefs_newest_checkpoint_loadable(tmp_path):
    cfg, run_dir, envs = _cluster(tmp_path, epochs=200)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [_start(cfg, env, log) for env, log in zip(envs, logs)]
    try:
        deadline = time.monotonic() + 400
        while not list((run_dir / "checkpoints").glob("ckpt-*.index")) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs[0].read_text(encoding="utf-8")[-3000:]
            time.sleep(0.5)
        assert list((run_dir / "checkpoints").glob("ckpt-*.index")), "no checkpoint in time"
        time.sleep(2)  # mid-way through later steps
        os.killpg(procs[1].pid, signal.SIGKILL)
        # The chief cannot go on without its peer: it stops with an error instead of waiting forever.
        code = procs[0].wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert code != 0
    from ddpm_tf.compat import tf

    newest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert newest is not None
    step = int(newest.rsplit("-", 1)[1])
    reader = tf.train.load_checkpoint(newest)
    assert int(reader.get_tensor("ema_updates/.ATTRIBUTES/VARIABLE_VALUE")) == step  # whole: the state of its step
    chief_log = logs[0].read_text(encoding="utf-8")
    assert "a worker of this multi_worker run is gone" in chief_log and "Traceback" not in chief_log, \
        chief_log[-3000:]
    # And the run resumes from it on one device.
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "ddpm_tf.cli", "train", "--config", str(cfg), "--set",
                           "train.distribute=none", "--set", f"train.epochs={math.ceil(step / 3) + 1}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"from step {step}" in done.stdout, done.stdout
