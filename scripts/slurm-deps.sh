#!/usr/bin/env bash
# What tests/test_slurm.py needs, installed idempotently: Debian's Slurm
# (controller, node daemon, client commands) and munge, and batchspawner
# into $VENV. The packages' own services are never used: the test starts
# its daemons with a key and a slurm.conf of its own in a temp dir, so a
# service the package may have started does not matter (nor is it stopped).
set -euo pipefail
VENV=${VENV:-/opt/nsprovisioner-venv}
bash "$(dirname "$0")/apt-missing.sh" slurmctld slurmd slurm-client munge
for tool in slurmctld slurmd sbatch squeue scancel munged; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "slurm-deps.sh: $tool did not install" >&2; exit 1; }
done
"$VENV/bin/python" -m pip install -q "batchspawner>=1.3" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import batchspawner" || { echo "slurm-deps.sh: batchspawner did not install into $VENV" >&2; exit 1; }
