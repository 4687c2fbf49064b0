#!/usr/bin/env bash
# Set up a fresh Debian machine and run the whole test suite twice: as root,
# and as a throw-away unprivileged user (the rootless path most people use);
# then the cgroup tests again on a pure cgroup-v2 kernel (scripts/vm-test.sh).
# Run as root (CI does: .ci/run runs exactly this).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export VENV=${VENV:-/opt/nsprovisioner-venv}
if [ "$(id -u)" -ne 0 ]; then
    echo "test-all.sh sets up packages, a test user and cgroups: run it as root (sudo)" >&2
    exit 1
fi
# CI builds the C code with -Werror; users' builds only warn.
CFLAGS="${CFLAGS:-} -Werror" bash "$REPO/scripts/setup-host.sh"
# tests/test_slurm.py: Debian's Slurm and munge, batchspawner (daemons started by the test)
bash "$REPO/scripts/slurm-deps.sh"
# The JupyterHub end-to-end test needs configurable-http-proxy, from npm.
if ! command -v configurable-http-proxy >/dev/null; then
    if ! command -v npm >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    npm install -g --silent configurable-http-proxy >/dev/null
fi


# The tests run from a copy outside the source tree, so that they import the
# installed package, and so that the test user can read them.
WORK=$(mktemp -d /tmp/nsprov-tests.XXXXXX)
TEST_USER="nsprovci$$"
GPU_NODES=""
cleanup() {
    local uid
    uid=$(id -u "$TEST_USER" 2>/dev/null) || uid=""
    pkill -KILL -u "$TEST_USER" 2>/dev/null || true
    userdel -r "$TEST_USER" >/dev/null 2>&1 || true
    # the user's pytest tmp and kernel-socket parent outlive it otherwise
    rm -rf "$WORK" "/tmp/pytest-of-$TEST_USER" ${uid:+"/tmp/nsprov-$uid"} ${GPU_NODES:+"$GPU_NODES"}
}
trap cleanup EXIT
cp -r "$REPO/tests" "$REPO/notebooks" "$REPO/share" "$REPO/csrc" "$WORK/"
cp "$REPO/pyproject.toml" "$WORK/"
chmod -R a+rX "$WORK"

echo "== static checks"
(cd "$REPO" && "$VENV/bin/ruff" check nsprovisioner tests benchmarks && "$VENV/bin/mypy" --strict nsprovisioner)

echo "== the wheel: sdist, manylinux wheel, installed without a compiler, a kernel from it"
status=0
bash "$REPO/scripts/wheel-test.sh" || status=1

echo "== tests as root"
(cd "$WORK" && NSPROV_REQUIRE_CGROUPS=1 "$VENV/bin/python" -m pytest tests -q \
    -p no:cacheprovider) || status=1

echo "== the clone stages under AddressSanitizer and UBSan"
bash "$REPO/scripts/asan-test.sh" "$VENV/bin/python" || status=1

echo "== tests as the unprivileged user $TEST_USER"
useradd --create-home --shell /bin/bash "$TEST_USER"
grep -q "^$TEST_USER:" /etc/subuid || usermod --add-subuids 200000-265535 --add-subgids 200000-265535 "$TEST_USER"
chown -R "$TEST_USER" "$WORK"
# Stand-in GPU nodes (tests/gpu_nodes.py): mknod needs root, so root makes them
# here, in the host's /dev (never nodev), and the user's tests bind them.
GPU_NODES=$(mktemp -d /dev/nsprov-gpu-test.XXXXXX)
(cd "$WORK" && "$VENV/bin/python" -m tests.gpu_nodes "$GPU_NODES")
# The user's run happens inside a cgroup subtree delegated to it, as systemd's
# Delegate=yes does, so that rootless kernels with limits work and are tested.
bash "$WORK/tests/delegate_cgroups.sh" "$TEST_USER" -- \
    env -i HOME="/home/$TEST_USER" USER="$TEST_USER" LOGNAME="$TEST_USER" LANG=C.UTF-8 \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" NSPROV_REQUIRE_CGROUPS=1 \
    NSPROV_TEST_GPU_NODES="$GPU_NODES" \
    bash -c "cd '$WORK' && exec python -m pytest tests -q -p no:cacheprovider" || status=1

echo "== the cgroup tests on a pure cgroup-v2 kernel, in a VM"
bash "$REPO/scripts/vm-test.sh" || status=1
exit $status
