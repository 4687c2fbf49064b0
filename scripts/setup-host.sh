#!/usr/bin/env bash
# Debian packages and the virtualenv that every nsprovisioner script uses.
#   VENV: made with Debian's python3; as root /opt/nsprovisioner-venv, which
#   unprivileged users (the rootless test run) can use too; otherwise
#   ~/.local/share/nsprovisioner-venv. apt-get runs through sudo for non-root.
#   Fails when anything fails to install or build.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
    VENV=${VENV:-$HOME/.local/share/nsprovisioner-venv}
fi
VENV=${VENV:-/opt/nsprovisioner-venv}
# EXTRAS: the optional dependencies installed with it ("test": the test tools;
# the demo asks for "demo", only what the tour needs)
EXTRAS=${EXTRAS:-test}

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
    echo "setup-host.sh: installing the Debian packages ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# pip's own output, but its notes about an index location it can't use; a
# failed install (a build that doesn't compile) fails this script
pip_install() {
    local out status=0
    out=$("$VENV/bin/python" -m pip install -q "$@" 2>&1) || status=$?
    grep -v "^WARNING: Location" <<<"$out" || true
    if [ "$status" -ne 0 ]; then
        echo "setup-host.sh: pip install $* failed (status $status)" >&2
        exit "$status"
    fi
}
say() { echo "setup-host.sh: $*"; }
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtualenv $VENV"
    /usr/bin/python3 -m venv "$VENV"
    pip_install --upgrade pip
fi
# A rerun on the same sources, extras and CFLAGS keeps the build it made (the
# demo's second run); any change to them rebuilds.
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAMP="$VENV/nsprovisioner-build.stamp"
stamp=$( (cd "$REPO" && find pyproject.toml setup.py MANIFEST.in csrc nsprovisioner share -type f \
              ! -name '*.so' ! -name nsinit ! -name '_nsexec.c' ! -path '*__pycache__*' |
          LC_ALL=C sort | xargs sha256sum; echo "extras=$EXTRAS cflags=${CFLAGS:-}") | sha256sum)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ] &&
        (cd / && "$VENV/bin/python" -c "import nsprovisioner._nsexec" 2>/dev/null); then
    say "nsprovisioner in $VENV is built from these sources already"
else
    rm -f "$STAMP"
    # The build's requirements (pyproject.toml's) go into the venv once, and the
    # build runs without isolation: an isolated build env costs ~10 s per install
    mapfile -t build_requires < <("$VENV/bin/python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
        "$REPO/pyproject.toml")
    [ "${#build_requires[@]}" -gt 0 ] ||
        { echo "setup-host.sh: no build requirements read from pyproject.toml" >&2; exit 1; }
    say "installing the build requirements (${build_requires[*]})"
    pip_install "${build_requires[@]}"
    say "building nsprovisioner (csrc/) and installing it with the $EXTRAS dependencies"
    pip_install --no-build-isolation "$REPO[$EXTRAS]"
    echo "$stamp" > "$STAMP"
fi
(cd / && "$VENV/bin/python" -c "import nsprovisioner._nsexec") || { echo "nsprovisioner did not install" >&2; exit 1; }
chmod -R a+rX "$VENV"
