#!/usr/bin/env bash
# Build (or reuse) both TensorFlow environments and run the checks and the whole test suite in each:
#   TensorFlow 2.10.1 + Keras 2 on Python 3.10, and the newest TensorFlow + Keras 3 on Python 3.11.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
# DDPM_TEST_LINES="latest" limits the run to one environment.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
status=0
for line in ${DDPM_TEST_LINES:-tf210 latest}; do
  env_dir="$(bash scripts/setup.sh "$line" | tail -n 1)" || { echo "test.sh: setting up $line failed" >&2; exit 1; }
  py="$env_dir/bin/python"
  echo "=== $line: $("$py" -c 'import sys, tensorflow as tf; print(f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}")' 2>/dev/null)"
  "$py" -m ruff check ddpm_tf tests scripts || status=1
  "$py" -m pytest -q "$@" || status=1
done
exit $status
