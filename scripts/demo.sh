#!/usr/bin/env bash
# The main job: set up this machine, then run notebooks/tour.ipynb in the
# sandboxed kernel (python3-sandboxed), write the executed notebook to
# ./tour.executed.ipynb and print what the kernel could and could not see.
# Installs only what it runs (the package and the "demo" extra: ipykernel,
# nbclient, nbformat), never the test tools.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -eq 0 ]; then
    export VENV=${VENV:-/opt/nsprovisioner-venv}
else
    export VENV=${VENV:-$HOME/.local/share/nsprovisioner-venv}
fi
start=$SECONDS
say() { echo "demo [$(( SECONDS - start )) s]: $*"; }
say "Debian packages, then nsprovisioner built into $VENV (scripts/setup-host.sh)"
EXTRAS=demo bash "$REPO/scripts/setup-host.sh"
say "running notebooks/tour.ipynb in the python3-sandboxed kernel"
"$VENV/bin/python" "$REPO/notebooks/run_tour.py" --output "${1:-$PWD/tour.executed.ipynb}"
say "done"
