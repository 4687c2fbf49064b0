#!/usr/bin/env bash
# Debian packages and the virtualenv that every nsprovisioner script uses.
#   VENV: made with Debian's python3; as root /opt/nsprovisioner-venv, which
#   unprivileged users (the rootless test run) can use too; otherwise
#   ~/.local/share/nsprovisioner-venv. apt-get runs through sudo for non-root.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
    VENV=${VENV:-$HOME/.local/share/nsprovisioner-venv}
fi
VENV=${VENV:-/opt/nsprovisioner-venv}

packages=(python3 python3-venv python3-dev gcc libc6-dev uidmap libseccomp2 libseccomp-dev util-linux
          procps passwd valgrind passt  # passt: pasta, the stack of network = "egress"
          chromium chromium-driver)  # tests/test_lab_browser.py: JupyterLab in a real browser
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node and npm build the JupyterLab extension (labextension/) from the npm registry;
# by command, not package: a node from elsewhere (NodeSource's) conflicts with Debian's npm
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q "$(dirname "$0")/..[test]" 2>&1 | grep -v "^WARNING: Location" || true
(cd / && "$VENV/bin/python" -c "import nsprovisioner._nsexec") || { echo "nsprovisioner did not install" >&2; exit 1; }
chmod -R a+rX "$VENV"
