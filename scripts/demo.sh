#!/usr/bin/env bash
# The demo, from a fresh clone: set up the newest-TensorFlow environment, fetch the ORL faces,
# train configs/demo.yaml (about 20 minutes on a 2-core CPU) and sample a grid of 64 faces.
#   bash scripts/demo.sh                 # everything
#   bash scripts/demo.sh --set train.epochs=10   # extra arguments go to `ddpm train`
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
env_dir="$(bash scripts/setup.sh latest | tail -n 1)"
"$env_dir/bin/python" scripts/fetch_orl.py data/orl
"$env_dir/bin/ddpm" train --config configs/demo.yaml "$@"
"$env_dir/bin/ddpm" sample --run runs/demo --n 64 --out runs/demo/demo-grid.png --overwrite  # the demo's own grid
echo "demo: the grid is runs/demo/demo-grid.png (single faces in runs/demo/demo-grid/)"
