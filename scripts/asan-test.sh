#!/usr/bin/env bash
# The helper (csrc/: Child, GrandChild and init, one program) and the
# server's clone under AddressSanitizer and UBSan: builds both with the
# sanitizers into a scratch copy of the package and runs the core tests
# against it, with the sanitizer runtimes preloaded into Python. (The helper
# runs under valgrind in tests/test_nsinit.py.)
#   scripts/asan-test.sh [PYTHON]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${1:-${VENV:-/opt/nsprovisioner-venv}/bin/python}
shift || true
SCRATCH=$(mktemp -d /tmp/nsprov-asan.XXXXXX)
chmod 755 "$SCRATCH"  # sandboxes mapped to other uids must be able to enter it
trap 'rm -rf "$SCRATCH"' EXIT
cp -r "$REPO/csrc" "$REPO/nsprovisioner" "$REPO/tests" "$SCRATCH/"
rm -f "$SCRATCH"/nsprovisioner/*.so
cd "$SCRATCH"
CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
LDFLAGS="-fsanitize=address,undefined" \
    "$PYTHON" -c "import runpy; runpy.run_path('nsprovisioner/_build.py')['ffibuilder'].compile(tmpdir='.')" \
    >/dev/null
# the helper, dynamic (the sanitizer runtimes are shared libraries)
gcc -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    -O1 -g -Wall -Wextra -Werror -std=gnu11 -Icsrc -o nsprovisioner/nsinit \
    $(ls csrc/*.c | grep -v '^csrc/nsclone\.c$')  # every C file but the server's clone
# handle_segv=0: the tests kill a sandboxed shell and the helper with SIGSEGV on
# purpose (a crash must stay a crash), and
# the preloaded runtime reaches that shell through the environment.
export PYTHONPATH="$SCRATCH"
export ASAN_OPTIONS=detect_leaks=0:handle_segv=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:handle_segv=0
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# the tests must load this build, not the installed one
"$PYTHON" -c "import nsprovisioner._nsexec as m; assert m.__file__.startswith('$SCRATCH'), m.__file__"
"$PYTHON" -c "import nsprovisioner.initexe as i; assert str(i.INIT_PATH).startswith('$SCRATCH'), i.INIT_PATH"
"$PYTHON" -m pytest tests/test_spawn.py -q -p no:cacheprovider "$@"
