#!/usr/bin/env bash
# Train the reference-sized portrait model on one NVIDIA GPU (e.g. an RTX 4090 with TensorFlow 2.10).
# GPU memory growth is on, so TensorFlow takes memory as it needs it instead of all of it at start.
#   bash scripts/train_4090.sh                      # configs/portrait64.yaml, images in data/portraits/
#   bash scripts/train_4090.sh --set train.precision=mixed_float16
# Use an environment with the GPU build:  DDPM_TF_FLAVOR=gpu bash scripts/setup.sh tf210
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export TF_FORCE_GPU_ALLOW_GROWTH=true
ddpm_bin="${DDPM_BIN:-$(command -v ddpm || true)}"
if [ -z "$ddpm_bin" ]; then
  ddpm_bin="$(DDPM_TF_FLAVOR="${DDPM_TF_FLAVOR:-gpu}" bash scripts/setup.sh tf210 | tail -n 1)/bin/ddpm"
fi
"$ddpm_bin" train --config configs/portrait64.yaml "$@"
"$ddpm_bin" sample --run runs/portrait64 --n 64
