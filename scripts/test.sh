#!/usr/bin/env bash
# Build (or reuse) both TensorFlow environments and run the checks and the whole test suite in each:
#   TensorFlow 2.10.1 + Keras 2 on Python 3.10, and the newest TensorFlow + Keras 3 on Python 3.11.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
# DDPM_TEST_LINES="latest" limits the run to one environment.
# The two lines run at the same time (DDPM_TEST_PARALLEL=0: one after the other): a line keeps about 0.7 of
# a core busy on average (tracing, process starts and small ops leave the rest idle), so two share 2 cores well.
# The first line's output streams; the second's is printed when it ends.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
lines=(${DDPM_TEST_LINES:-tf210 latest})
# The CPU decides which TensorFlow kernels run (oneDNN, bfloat16, AMX): say which one this run had.
echo "=== CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs), $(nproc) cores;" \
  "flags: $(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx512_bf16\|amx_tile' /proc/cpuinfo 2>/dev/null | sort -u | xargs)"

declare -A env_dirs
for line in "${lines[@]}"; do  # one at a time: two pip installs at once would fight over the network and disk
  env_dirs[$line]="$(bash scripts/setup.sh "$line" | tail -n 1)" || { echo "test.sh: setting up $line failed" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/ddpm-tf-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT

run_line() {  # run_line LINE PYTEST_ARGS...: ruff and pytest in that line's environment; its own pytest tmp dir
  local line="$1" py="${env_dirs[$1]}/bin/python" status=0
  shift
  echo "=== $line: $("$py" -c 'import sys, tensorflow as tf; print(f"Python {sys.version.split()[0]}, TensorFlow {tf.__version__}")' 2>/dev/null)"
  "$py" -m ruff check ddpm_tf tests scripts || status=1
  "$py" -m pytest -q --basetemp "$work/pytest-$line" "$@" || status=1
  echo "=== $line: $([ $status = 0 ] && echo passed || echo FAILED) after ${SECONDS}s"
  return $status
}

status=0
if [ "${DDPM_TEST_PARALLEL:-1}" = 1 ] && [ "${#lines[@]}" -gt 1 ]; then
  pids=()
  for i in "${!lines[@]}"; do
    if [ "$i" = 0 ]; then
      run_line "${lines[$i]}" "$@" &
    else
      run_line "${lines[$i]}" "$@" > "$work/${lines[$i]}.log" 2>&1 &
    fi
    pids+=($!)
  done
  for i in "${!lines[@]}"; do
    wait "${pids[$i]}" || status=1
    [ "$i" = 0 ] || cat "$work/${lines[$i]}.log"
  done
else
  for line in "${lines[@]}"; do
    run_line "$line" "$@" || status=1
  done
fi
exit $status
