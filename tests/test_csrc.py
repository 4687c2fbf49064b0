"""The clone stages use no libc beyond pure string functions (csrc/nsxsys.h).

The Child and GrandChild run in the server's memory with the TLS of the
server thread that cloned them: a libc wrapper would store errno there, and
anything that takes a lock could deadlock with that thread. So the object
files of the stages must not reference any libc function but these.
"""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
STAGE_SOURCES = ("nsexec.c", "nsmount.c", "nsnet.c", "nsxsys.c")
PURE = {"memset", "memcpy", "memmove", "strlen", "__stack_chk_fail", "__memcpy_chk",
        "__memset_chk", "_GLOBAL_OFFSET_TABLE_"}
OWN = {"nsx_clone3", "nsx_exit", "nsx_run_mount_op", "nsx_mount_op_name", "nsx_net_setup"}


def undefined_symbols(source: Path, opt: str, tmp_path: Path) -> set[str]:
    obj = tmp_path / f"{source.stem}{opt}.o"
    flags = [f for f in (sysconfig.get_config_var("CFLAGS") or "").split()
             if f.startswith(("-f", "-D", "-m"))]  # hardening as the real build has it
    subprocess.run(["gcc", opt, *flags, "-fPIC", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                    f"-I{CSRC}", "-c", str(source), "-o", str(obj)], check=True)
    out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("opt", ["-O0", "-O2"])
@pytest.mark.parametrize("name", STAGE_SOURCES)
def test_clone_stages_call_no_libc(name: str, opt: str, tmp_path: Path) -> None:
    if not CSRC.exists():
        pytest.fail(f"{CSRC} is missing: run the tests from a checkout (scripts/test-all.sh "
                    "copies csrc next to tests)")
    used = undefined_symbols(CSRC / name, opt, tmp_path)
    if name == "nsxsys.c":
        used -= {"syscall", "__errno_location", "clone"}  # fork mode only (#else branch)
    assert used <= PURE | OWN, sorted(used - PURE - OWN)


def test_the_check_sees_a_libc_call(tmp_path: Path) -> None:
    """The check above can fail: the Parent's side (nsclone.c) uses libc freely."""
    used = undefined_symbols(CSRC / "nsclone.c", "-O2", tmp_path)
    assert {"mmap", "pthread_sigmask"} <= used
