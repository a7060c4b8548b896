"""Where training runs: one device, every GPU of this machine (MirroredStrategy), or several machines
(MultiWorkerMirroredStrategy, from TF_CONFIG or Slurm). Training asks this module for its strategy and scope;
nothing here knows about diffusion.

Data parallelism only, all of it TensorFlow's: each replica takes `train.batch_size` (x `train.accumulate`)
images of every global batch, the gradients are summed over replicas by the strategy's all-reduce, and every
variable (weights, Adam's moments, the EMA copy, the counters) is mirrored, so one checkpoint holds the run.

TF-free at import (config.py reads MODES); TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

MODES = ("none", "mirrored", "multi_worker", "auto")  # train.distribute

# Seconds a collective (a step, a barrier) waits for its peers before failing, so a dead worker cannot hang the
# others forever. Long enough for the chief's previews and in-training evaluations, which the others wait out.
COLLECTIVE_TIMEOUT = 1800


@dataclass
class Placement:
    """The strategy training runs under, and what this process is in it."""

    strategy: object  # a tf.distribute.Strategy (the default one for `none`)
    mode: str  # none | mirrored | multi_worker (auto resolved)
    replicas: int  # replicas in sync, over all workers
    workers: int
    task: str  # "chief" or "worker 1" ...: who this process is
    is_chief: bool  # writes the run's files; the others write to a scratch folder

    def describe(self, per_replica: int, accumulate: int) -> str:
        """One line for the log: the global batch and how it is split."""
        global_batch = per_replica * accumulate * self.replicas
        if self.mode == "none":
            return f"devices: one ({self.strategy_device()}), global batch {global_batch}"
        micro = f" ({accumulate} accumulated micro-batches of {per_replica})" if accumulate > 1 else ""
        where = f"{self.workers} workers, " if self.workers > 1 else ""
        return (f"devices: {self.mode}, {where}{self.replicas} replicas, global batch {global_batch} = "
                f"{per_replica * accumulate} per replica{micro} x {self.replicas}; this process is the {self.task}")

    def strategy_device(self) -> str:
        from .compat import tf

        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def split_cpu(count: int) -> None:
    """Make `count` logical CPU devices on a machine without GPUs (tests, `ddpm bench --replicas`); nothing where
    there are GPUs. Must run before TensorFlow initialises its devices."""
    from .compat import tf

    if tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def cluster_resolver():
    """TF_CONFIG when set, else Slurm's environment through TensorFlow's SlurmClusterResolver, else None."""
    from .compat import tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_PROCID"):
        return tf.distribute.cluster_resolver.SlurmClusterResolver()
    return None


def check_tf_config() -> None:
    """A malformed TF_CONFIG is one clear line, not TensorFlow's traceback."""
    from .errors import ConfigError

    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        assert isinstance(cluster, dict) and task["type"] in cluster and 0 <= int(task["index"]) < len(
            cluster[task["type"]])
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ConfigError(
            f"TF_CONFIG is not a usable cluster description ({type(exc).__name__}: {exc}); expected JSON like "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
        ) from None


def make_placement(mode: str) -> Placement:
    """The strategy for train.distribute. Call before any other TensorFlow op: the multi-worker strategy
    configures the process's collective ops and must come first."""
    from .compat import tf
    from .errors import ConfigError

    assert mode in MODES, mode
    if mode in ("auto", "multi_worker"):
        check_tf_config()
    gpus = tf.config.list_physical_devices("GPU")
    if mode == "auto":
        mode = "multi_worker" if cluster_resolver() is not None else "mirrored" if len(gpus) > 1 else "none"
    if mode == "none":
        return Placement(tf.distribute.get_strategy(), "none", 1, 1, "chief", True)
    if mode == "mirrored":
        return mirrored()
    resolver = cluster_resolver()
    if resolver is None:
        raise ConfigError("train.distribute is multi_worker, but neither TF_CONFIG nor Slurm (SLURM_JOB_ID, "
                          "SLURM_PROCID) describes the cluster; see scripts/train_multiworker.sh")
    # Collectives time out instead of waiting forever when a worker dies (never hang); the health check
    # notices a dead peer and fails the others' collectives.
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    chief = is_chief(resolver.cluster_spec().as_dict(), task_type, task_id)
    workers = sum(len(v) for k, v in resolver.cluster_spec().as_dict().items() if k in ("chief", "worker"))
    return Placement(strategy, "multi_worker", strategy.num_replicas_in_sync, workers,
                     "chief" if chief else f"{task_type} {task_id}", chief)


def xla_problem() -> str | None:
    """Why the strategy in scope cannot run an XLA-compiled step, or None: TensorFlow compiles no collective for
    CPU devices ("Collectives are not yet implemented for CPU devices when compiling with XLA", TF 2.10 to 2.21),
    so a step of several CPU replicas runs as a plain graph. GPUs compile theirs (NCCL all-reduce)."""
    from .compat import tf

    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1 and not tf.config.list_physical_devices("GPU"):
        return "TensorFlow's XLA compiles no collective for CPU devices, and replicas all-reduce their gradients"
    return None


def mirrored(count: int | None = None) -> Placement:
    """MirroredStrategy over the first `count` (default: every) GPU of this machine; without GPUs, over its logical
    CPU devices (tests and `ddpm bench --replicas` split the CPU: split_cpu)."""
    from .compat import tf
    from .errors import ConfigError

    kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    devices = [d.name for d in tf.config.list_logical_devices(kind)]
    if count is not None and count > len(devices):
        raise ConfigError(f"{count} replicas asked for, but this machine has {len(devices)} {kind} device(s)")
    strategy = tf.distribute.MirroredStrategy(devices=devices[:count])
    return Placement(strategy, "mirrored", strategy.num_replicas_in_sync, 1, "chief", True)


def is_chief(cluster: dict, task_type: str | None, task_id: int) -> bool:
    """TensorFlow's convention: the `chief` task, or worker 0 when the cluster has no chief."""
    if task_type == "chief":
        return True
    return task_type in (None, "worker") and task_id == 0 and "chief" not in cluster


def _gather(placement: Placement, value: int) -> list[int]:
    """`value` of every replica of every worker (one all-gather), in replica order."""
    from .compat import tf

    @tf.function
    def gather():
        def mine():
            return tf.distribute.get_replica_context().all_gather(tf.constant([value], tf.int64), axis=0)

        return placement.strategy.run(mine)

    return placement.strategy.experimental_local_results(gather())[0].numpy().tolist()


def barrier(placement: Placement) -> None:
    """Wait until every worker reaches this point (one small all-gather); a no-op on one machine."""
    if placement.workers > 1:
        _gather(placement, 0)


def agree(placement: Placement, value: int) -> bool:
    """Whether every worker holds the same `value` (a restored step, say); True on one machine."""
    return placement.workers == 1 or len(set(_gather(placement, int(value)))) == 1


def shard_policy_options():
    """tf.data options for the multi-worker case: each worker keeps its part of every global batch (the dataset
    is rebatched to per-replica batches, worker w takes every k-th of them), not whole files."""
    from .compat import tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options
