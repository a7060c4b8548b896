#!/usr/bin/env bash
# Train a portrait model on one NVIDIA GPU (e.g. an RTX 4090, 24 GB, with TensorFlow 2.10), then sample 64 images
# from the run it trained. GPU memory growth is on, so TensorFlow takes memory as it needs it instead of all at start.
#   bash scripts/train_4090.sh                      # configs/portrait64.yaml, images in data/portraits/
#   bash scripts/train_4090.sh portrait128          # configs/portrait128.yaml: 128x128, gradient checkpointing on
#   bash scripts/train_4090.sh --set train.precision=mixed_float16
#   bash scripts/train_4090.sh portrait128 --set run.dir=runs/faces128 --set train.epochs=400
#   CONFIG=configs/mine.yaml bash scripts/train_4090.sh
# The config: a first argument that does not start with '-' (a name in configs/ or a path), else $CONFIG, else
# portrait64. Every other argument goes to `ddpm train`; the samples come from the run it trained (run.dir,
# including a --set run.dir=...). Use an environment with the GPU build:  DDPM_TF_FLAVOR=gpu bash scripts/setup.sh tf210
# DDPM_BIN picks the ddpm executable (default: the one on PATH, else that environment's).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export TF_FORCE_GPU_ALLOW_GROWTH=true

config="${CONFIG:-portrait64}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  config="$1"
  shift
fi
if [ ! -f "$config" ]; then
  if [ -f "configs/$config.yaml" ]; then
    config="configs/$config.yaml"
  else
    names="$(cd configs && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"
    echo "train_4090.sh: no config '$config': expected a file or one of: $names" >&2
    exit 2
  fi
fi

ddpm_bin="${DDPM_BIN:-$(command -v ddpm || true)}"
if [ -z "$ddpm_bin" ]; then
  ddpm_bin="$(DDPM_TF_FLAVOR="${DDPM_TF_FLAVOR:-gpu}" bash scripts/setup.sh tf210 | tail -n 1)/bin/ddpm"
fi

# The run directory, as `ddpm train` resolves it: the config with the same --set overrides.
overrides=()
previous=""
for arg in "$@"; do
  if [ "$previous" = "--set" ]; then overrides+=("$arg"); fi
  case "$arg" in --set=*) overrides+=("${arg#--set=}") ;; esac
  previous="$arg"
done
python_bin="$(dirname "$ddpm_bin")/python"
[ -x "$python_bin" ] || python_bin=python3
run_dir="$("$python_bin" -c '
import sys
from ddpm_tf.config import load_config
from ddpm_tf.errors import ConfigError
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run.dir)
except ConfigError as exc:
    sys.exit(f"error: {exc}")' "$config" ${overrides[@]+"${overrides[@]}"})"

"$ddpm_bin" train --config "$config" "$@"
"$ddpm_bin" sample --run "$run_dir" --n 64
