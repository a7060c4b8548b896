#!/usr/bin/env bash
# Build (or reuse) both TensorFlow environments and run the checks and the whole test suite in each:
#   TensorFlow 2.10.1 + Keras 2 on Python 3.10, and the newest TensorFlow + Keras 3 on Python 3.11.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
# DDPM_TEST_LINES="latest" limits the run to one environment.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
status=0
# The CPU decides which TensorFlow kernels run (oneDNN, bfloat16, AMX): say which one this run had.
echo "=== CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs), $(nproc) cores;" \
  "flags: $(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx512_bf16\|amx_tile' /proc/cpuinfo 2>/dev/null | sort -u | xargs)"
for line in ${DDPM_TEST_LINES:-tf210 latest}; do
  env_dir="$(bash scripts/setup.sh "$line" | tail -n 1)" || { echo "test.sh: setting up $line failed" >&2; exit 1; }
  py="$env_dir/bin/python"
  echo "=== $line: $("$py" -c 'import sys, tensorflow as tf; print(f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}")' 2>/dev/null)"
  "$py" -m ruff check ddpm_tf tests scripts || status=1
  "$py" -m pytest -q "$@" || status=1
done
exit $status
