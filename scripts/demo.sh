#!/usr/bin/env bash
# The main job: set up this machine, then run notebooks/tour.ipynb in the
# sandboxed kernel (python3-sandboxed), write the executed notebook to
# ./tour.executed.ipynb and print what the kernel could and could not see.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -eq 0 ]; then
    export VENV=${VENV:-/opt/nsprovisioner-venv}
else
    export VENV=${VENV:-$HOME/.local/share/nsprovisioner-venv}
fi
bash "$REPO/scripts/setup-host.sh"
"$VENV/bin/python" "$REPO/notebooks/run_tour.py" --output "${1:-$PWD/tour.executed.ipynb}"
