#!/usr/bin/env bash
# Debian packages and the virtualenv that every nsprovisioner script uses.
#   VENV (default /opt/nsprovisioner-venv): made with Debian's python3, so that
#   unprivileged users (the rootless test run) can use it too.
set -euo pipefail
VENV=${VENV:-/opt/nsprovisioner-venv}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

packages=(python3 python3-venv python3-dev gcc libc6-dev uidmap libseccomp2 util-linux
          procps passwd)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    $SUDO /usr/bin/python3 -m venv "$VENV"
    [ -z "$SUDO" ] || $SUDO chown -R "$(id -u):$(id -g)" "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q "$(dirname "$0")/..[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import nsprovisioner._nsexec" || { echo "nsprovisioner did not install" >&2; exit 1; }
chmod -R a+rX "$VENV" 2>/dev/null || $SUDO chmod -R a+rX "$VENV"
