#!/usr/bin/env bash
# Create (or reuse) a virtual environment with ddpm_tf installed, outside the repository.
#
#   bash scripts/setup.sh            # newest TensorFlow (Keras 3) on python3.11+   -> prints the venv path
#   bash scripts/setup.sh tf210      # TensorFlow 2.10.1 (Keras 2) on python3.10
#   DDPM_TF_FLAVOR=gpu bash scripts/setup.sh tf210   # `tensorflow` (GPU build) instead of `tensorflow-cpu`
#
# Environments live under $DDPM_ENV_ROOT (default ~/.cache/ddpm_tf/envs) and are reused when present:
# an environment is rebuilt only when its marker file is missing (an interrupted install).
# The last line printed on stdout is the environment's directory; progress goes to stderr.
set -euo pipefail
line="${1:-latest}"
flavor="${DDPM_TF_FLAVOR:-cpu}"
root="${DDPM_ENV_ROOT:-$HOME/.cache/ddpm_tf/envs}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_python() {  # find_python 3.10 -> path of an interpreter of that minor version
  local want="$1" cand
  for cand in "python$want" "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/$want"*/bin/python)"; do
    for c in $cand; do
      if [ -x "$(command -v "$c" 2>/dev/null || echo "$c")" ] && \
         "$c" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" 2>/dev/null; then
        command -v "$c" 2>/dev/null || echo "$c"; return 0
      fi
    done
  done
  return 1
}

case "$line" in
  tf210)  pyver=3.10; tfpkg="tensorflow-$flavor==2.10.1"; extra=("numpy<1.24") ;;
  latest) pyver=3.11; tfpkg="tensorflow-$flavor"; extra=() ;;
  *) echo "setup.sh: unknown environment '$line' (expected: latest or tf210)" >&2; exit 2 ;;
esac
[ "$flavor" = gpu ] && tfpkg="${tfpkg/tensorflow-gpu/tensorflow}"
[ "$flavor" = cpu ] || [ "$flavor" = gpu ] || { echo "setup.sh: DDPM_TF_FLAVOR must be cpu or gpu, not '$flavor'" >&2; exit 2; }

env_dir="$root/py$pyver-$line-$flavor"
marker="$env_dir/.ddpm_tf_ready"
if [ ! -f "$marker" ]; then
  py="$(find_python "$pyver")" || { echo "setup.sh: no python$pyver found (on PATH or under pyenv)" >&2; exit 1; }
  echo "setup.sh: building $env_dir with $py and $tfpkg (about 1.5 GB, a few minutes)" >&2
  rm -rf "$env_dir"
  mkdir -p "$root"
  "$py" -m venv "$env_dir"
  "$env_dir/bin/python" -m pip install -q --upgrade pip >&2
  "$env_dir/bin/python" -m pip install -q "$tfpkg" "${extra[@]}" >&2
  # --no-deps on the project itself would skip click & co; its tensorflow requirement lives in extras.
  # The face extra (OpenCV) is resolved together with numpy<1.24 on tf210, which selects an OpenCV 4.11; the
  # ui extra (Gradio 5, pandas) installs under numpy<1.24 too.
  "$env_dir/bin/python" -m pip install -q -e "$repo[test,face,ui]" "${extra[@]}" >&2
  touch "$marker"
else
  # Reuse: refresh the editable install only (cheap, and picks up new dependencies).
  "$env_dir/bin/python" -m pip install -q -e "$repo[test,face,ui]" "${extra[@]}" >&2
fi
echo "$env_dir"
