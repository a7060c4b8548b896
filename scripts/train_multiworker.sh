#!/usr/bin/env bash
# Start ONE worker of a multi-machine training run (train.distribute: multi_worker, TensorFlow's
# MultiWorkerMirroredStrategy). Run it on every machine, each with its own index; the worker with index 0 is the
# chief: it alone writes the run (checkpoints, exports, previews, metrics.csv, TensorBoard) and holds its lock.
#
#   bash scripts/train_multiworker.sh INDEX HOST0:PORT,HOST1:PORT[,...] --config configs/portrait128.yaml [ddpm train options]
#
# Two machines, gpu-a and gpu-b, port 12345 open between them, the repository and the data on both:
#   gpu-a$ bash scripts/train_multiworker.sh 0 gpu-a:12345,gpu-b:12345 --config configs/portrait128.yaml
#   gpu-b$ bash scripts/train_multiworker.sh 1 gpu-a:12345,gpu-b:12345 --config configs/portrait128.yaml
# Start them in any order: each waits for the others. train.batch_size is per replica
# (GPU): the global batch is batch_size x accumulate x all GPUs of all machines, printed at start.
#
# run.dir must be one folder all workers see (NFS or similar) so that every worker resumes from the chief's
# newest checkpoint; a worker whose view differs stops with an error naming the steps. The data folder may be
# shared or copied to each machine (the cache is prepared by the chief first, then by the others). After a crash,
# start all workers again with the same command: the run resumes, with the same or another number of machines,
# or on one machine with --set train.distribute=none.
#
# Under Slurm, skip this script: `srun ddpm train --config ... --set train.distribute=multi_worker` on every task;
# TensorFlow's SlurmClusterResolver reads the cluster from Slurm's environment (SLURM_JOB_ID, SLURM_PROCID, ...).
#
# DDPM_BIN picks the ddpm executable (default: the one on PATH, else the tf210 GPU environment of setup.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
index="$1"; hosts="$2"; shift 2
case "$index" in ''|*[!0-9]*) echo "train_multiworker.sh: INDEX must be a number (0 is the chief), not '$index'" >&2; exit 2 ;; esac
IFS=, read -r -a workers <<< "$hosts"
if [ "$index" -ge "${#workers[@]}" ]; then
  echo "train_multiworker.sh: INDEX $index, but only ${#workers[@]} workers in '$hosts' (0 to $(( ${#workers[@]} - 1 )))" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export TF_FORCE_GPU_ALLOW_GROWTH=true
list="$(printf '"%s",' "${workers[@]}")"
export TF_CONFIG="{\"cluster\": {\"worker\": [${list%,}]}, \"task\": {\"type\": \"worker\", \"index\": $index}}"
ddpm_bin="${DDPM_BIN:-$(command -v ddpm || true)}"
if [ -z "$ddpm_bin" ]; then
  ddpm_bin="$(DDPM_TF_FLAVOR="${DDPM_TF_FLAVOR:-gpu}" bash scripts/setup.sh tf210 | tail -n 1)/bin/ddpm"
fi
exec "$ddpm_bin" train --set train.distribute=multi_worker "$@"
