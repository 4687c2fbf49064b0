"""What runs in the server's memory, and the build's guard for other architectures.

The only C the server runs is nsclone.c: a clone with vfork semantics whose
new process clears close-on-exec on one fd and execs the helper. Its object
may call nothing of libc but syscall(2) and what the Parent's side needs
after the clone returns; everything else lives in the helper, a process of
its own.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# every C file but the server side's clone, as setup.py builds the helper
HELPER_SOURCES = tuple(sorted(p.name for p in CSRC.glob("*.c") if p.name != "nsclone.c"))
# syscall(2) in the clone; after it, in the server: waitpid and close (a
# failed exec), and the compiler's own helpers
SERVER_SIDE = {"syscall", "waitpid", "close", "__errno_location", "memset",
               "__stack_chk_fail", "_GLOBAL_OFFSET_TABLE_"}


def compile_object(source: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [f for f in (sysconfig.get_config_var("CFLAGS") or "").split()
             if f.startswith(("-f", "-D", "-m"))]  # hardening as the real build has it
    return subprocess.run(["gcc", "-O2", *flags, "-fPIC", "-Wall", "-Wextra", "-Werror",
                           "-std=gnu11", f"-I{CSRC}", *extra, "-c", str(source), "-o",
                           str(tmp_path / f"{source.stem}.o")],
                          capture_output=True, text=True, check=False)


@pytest.fixture(autouse=True)
def sources_present() -> None:
    if not CSRC.exists():
        pytest.fail(f"{CSRC} is missing: run the tests from a checkout (scripts/test-all.sh "
                    "copies csrc next to tests)")


def test_the_server_side_calls_only_syscall(tmp_path: Path) -> None:
    assert compile_object(CSRC / "nsclone.c", tmp_path).returncode == 0
    out = subprocess.run(["nm", "-u", str(tmp_path / "nsclone.o")], capture_output=True,
                         text=True, check=True).stdout
    used = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert "syscall" in used  # the check sees calls
    assert used <= SERVER_SIDE, sorted(used - SERVER_SIDE)


@pytest.mark.parametrize("name", [*HELPER_SOURCES, "nsclone.c"])
def test_every_source_builds_without_warnings(name: str, tmp_path: Path) -> None:
    result = compile_object(CSRC / name, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["nsclone.c", "nsinit.c"])
def test_an_unsupported_architecture_fails_the_build_by_name(name: str, tmp_path: Path) -> None:
    result = compile_object(CSRC / name, tmp_path, "-U__x86_64__", "-U__aarch64__")
    assert result.returncode != 0
    assert "x86_64 and aarch64 only" in result.stderr


def test_no_inline_assembly_in_the_helper() -> None:
    for name in HELPER_SOURCES:
        assert "__asm__" not in (CSRC / name).read_text(), name
