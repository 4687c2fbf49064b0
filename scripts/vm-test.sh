#!/usr/bin/env bash
# The cgroup-version and delegation dependent tests on a pure cgroup-v2 kernel,
# the hosts most users have, whatever this machine's own cgroup setup is.
# Boots Debian's kernel (linux-image-amd64) with virtme-ng under qemu over
# this machine's filesystem (read-only, with throw-away overlays on /etc,
# /home, /tmp ...), without KVM (nested KVM does not boot a guest everywhere;
# TCG always does), and runs scripts/vm-guest.sh inside. Run as root (CI
# does: scripts/test-all.sh calls it).
#   VENV        the project's venv, installed (default /opt/nsprovisioner-venv)
#   VNG_VENV    virtme-ng's own venv (default /opt/virtme-ng-venv)
#   VM_KERNEL   the kernel image to boot (default: the newest /boot/vmlinuz-*)
#   VM_BOOT_WAIT  seconds to wait for the guest's first line before it is
#               killed and booted once more (default 180)
# Exits with the guest's status; the tests' output is shown as they run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/opt/nsprovisioner-venv}
VNG_VENV=${VNG_VENV:-/opt/virtme-ng-venv}
if [ "$(id -u)" -ne 0 ]; then
    echo "vm-test.sh installs packages and makes a test user in the VM: run it as root" >&2
    exit 1
fi
start=$SECONDS

# qemu, a kernel to boot (its modules too: virtme-ng loads 9p and virtio
# from them), and busybox for virtme's fallback init.
bash "$(dirname "$0")/apt-missing.sh" qemu-system-x86 linux-image-amd64 busybox-static python3-venv
if [ ! -x "$VNG_VENV/bin/vng" ]; then
    /usr/bin/python3 -m venv "$VNG_VENV"
    "$VNG_VENV/bin/python" -m pip install -q virtme-ng 2>&1 | grep -v "^WARNING: Location" || true
fi
[ -x "$VNG_VENV/bin/vng" ] || { echo "vm-test.sh: virtme-ng did not install" >&2; exit 1; }
kernel=${VM_KERNEL:-$(ls -v /boot/vmlinuz-* 2>/dev/null | tail -n 1)}
[ -n "$kernel" ] && [ -r "$kernel" ] ||
    { echo "vm-test.sh: no kernel in /boot (apt-get install linux-image-amd64)" >&2; exit 1; }

# The test copy: /tmp is an overlay in the VM, so the guest sees it as made
# here and may chown it to its test user without touching this machine.
WORK=$(mktemp -d /tmp/nsprov-vm-tests.XXXXXX)
trap 'rm -rf "$WORK" "$WORK.out"' EXIT
cp -r "$REPO/tests" "$REPO/notebooks" "$REPO/share" "$REPO/csrc" "$REPO/scripts" "$WORK/"
cp "$REPO/pyproject.toml" "$WORK/"
chmod -R a+rX "$WORK" "$VENV"
echo "== vm: setup $(( SECONDS - start )) s; booting $kernel (qemu without KVM)"

# The pid and every descendant of it (vng, virtme-run and qemu don't take their
# children with them when they die).
tree() {
    local pid
    echo "$1"
    for pid in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$pid"; done
}

# One boot. The guest's first line comes ~20 s after qemu starts (60 s on a
# loaded machine); now and then a TCG guest hangs before it and would hold CI
# for the whole timeout: a guest that has not spoken in VM_BOOT_WAIT s is
# killed, and the boot returns 75.
BOOT_WAIT=${VM_BOOT_WAIT:-180}
boot() {
    local out="$WORK.out" vm waited=0 rc=0
    : >"$out"
    # virtme-ng finds its helpers (virtme-run ...) on PATH. The VM gets both CPUs
    # of a 2-core CI machine: the cpu limit test needs two to tell 0.5 from busy.
    # Through a pipe: qemu opens /proc/self/fd/1 (and 2) anew, with O_TRUNC, which
    # on a file would erase what came before. (pipefail: the subshell's status
    # is vng's.)
    (PATH="$VNG_VENV/bin:$PATH" timeout 1200 vng --disable-kvm --run "$kernel" --memory 4G \
        --cpus 2 --cwd "$WORK" -- bash "$WORK/scripts/vm-guest.sh" "$VENV" "$WORK" 2>&1 |
        cat >>"$out") &
    vm=$!
    while ! grep -q "^== vm: " "$out" && kill -0 "$vm" 2>/dev/null; do
        if [ "$waited" -ge "$BOOT_WAIT" ]; then
            # shellcheck disable=SC2046  # one pid per word
            kill -KILL $(tree "$vm") 2>/dev/null || true
            wait "$vm" 2>/dev/null || true
            echo "== vm: no word from the guest in $BOOT_WAIT s: killed"
            rm -f "$out"
            return 75
        fi
        sleep 1
        waited=$(( waited + 1 ))
    done
    tail -n +1 -f --pid="$vm" "$out"  # shown as they run
    wait "$vm" || rc=$?
    rm -f "$out"
    return $rc
}

status=0
boot || status=$?
if [ "$status" -eq 75 ]; then
    echo "== vm: booting again"
    status=0
    boot || status=$?
fi
echo "== vm: the pure cgroup-v2 pass took $(( SECONDS - start )) s (status $status)"
exit $status
