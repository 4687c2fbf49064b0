"""The privilege boundary: capabilities, no_new_privs, seccomp, the init binary, fds.

All through spawn(), with a Python probe inside (see test_boundary.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsprovisioner import SandboxSpec, spawn
from nsprovisioner.idmap import subordinate_ranges
from nsprovisioner.seccomp import DENIED, _load_libseccomp

from .conftest import run
from .test_boundary import probe

CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

STATUS = """
status = proc_status()
out["status"] = {k: status[k] for k in
                 ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                  "Uid")}
"""


@pytest.mark.parametrize("user", ["self", "root"])
def test_no_capabilities_no_new_privs_seccomp_and_no_tty(no_leaks: None, user: str) -> None:
    r = probe(SandboxSpec(user=user), STATUS, """
        out["tty_nr"] = int(read("/proc/self/stat").rsplit(")", 1)[1].split()[4])
        out["dev_tty"] = err(read, "/dev/tty")
    """)
    for field in CAP_FIELDS:
        assert r["status"][field] == "0000000000000000", field
    assert r["status"]["NoNewPrivs"] == "1"
    assert r["status"]["Seccomp"] == "2"
    assert r["status"]["Uid"].split()[0] == ("0" if user == "root" else str(os.getuid()))
    assert r["tty_nr"] == 0 and r["dev_tty"] == "ENXIO"


def syscall_numbers() -> dict[str, int]:
    _ffi, lib = _load_libseccomp()
    numbers = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in DENIED}
    return {name: nr for name, nr in numbers.items() if nr >= 0}  # not on this arch: no call


SYSCALL_PROBE = """
L = ctypes.c_long
libc.syscall.restype = L
def call(nr, *args):
    return sys_err(libc.syscall(L(nr), *[L(a) for a in args]))

CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
TIOCSTI, TIOCLINUX, TIOCGWINSZ = 0x5412, 0x541C, 0x5413
out["denied"] = {name: call(nr, 0, 0, 0, 0, 0, 0) for name, nr in NUMBERS.items()}
out["clone3"] = call(435, 0, 0)
out["unshare_user"] = call(272, CLONE_NEWUSER)
out["unshare_nothing"] = call(272, 0)
pid = libc.syscall(L(56), L(CLONE_NEWUSER | SIGCHLD), L(0), L(0), L(0), L(0))
if pid == 0:
    os._exit(0)  # only if the filter failed: never run the rest twice
out["clone_user"] = sys_err(pid)
if pid > 0:
    os.waitpid(pid, 0)
ptm = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
c = ctypes.c_char(b"x")
ws = ctypes.create_string_buffer(8)
out["tiocsti"] = call(16, ptm, TIOCSTI, ctypes.addressof(c))
out["tiocsti_high_bits"] = call(16, ptm, (1 << 32) | TIOCSTI, ctypes.addressof(c))
out["tioclinux"] = call(16, ptm, TIOCLINUX, ctypes.addressof(c))
out["tiocgwinsz"] = call(16, ptm, TIOCGWINSZ, ctypes.addressof(ws))
out["keyctl"] = call(250, 0, -3, 1)  # KEYCTL_GET_KEYRING_ID, session keyring, create

import subprocess, threading, time
t = threading.Thread(target=lambda: None)
t.start()
t.join()
out["thread"] = True
out["subprocess"] = subprocess.run(["true"]).returncode

# a debugger still works: trace a child of our own
child = subprocess.Popen(["sleep", "5"])
out["ptrace_attach"] = call(101, 16, child.pid, 0, 0)  # PTRACE_ATTACH
os.waitpid(child.pid, os.WUNTRACED)
out["ptrace_detach"] = call(101, 17, child.pid, 0, 0)  # PTRACE_DETACH
child.kill()
child.wait()
"""


def test_each_denied_syscall_returns_eperm(no_leaks: None) -> None:
    numbers = syscall_numbers()
    assert {"mount", "umount2", "bpf", "keyctl", "open_tree"} <= set(numbers)
    r = probe(SandboxSpec(), f"NUMBERS = {numbers!r}", SYSCALL_PROBE)
    for name in numbers:
        assert r["denied"][name] == "EPERM", name
    assert r["clone3"] == "ENOSYS"
    assert r["unshare_user"] == "EPERM" and r["unshare_nothing"] is None
    assert r["clone_user"] == "EPERM"
    assert r["tiocsti"] == "EPERM" and r["tiocsti_high_bits"] == "EPERM"
    assert r["tioclinux"] == "EPERM"
    assert r["tiocgwinsz"] is None
    assert r["keyctl"] == "EPERM"
    assert r["thread"] and r["subprocess"] == 0  # libc falls back from clone3 to clone
    assert r["ptrace_attach"] is None and r["ptrace_detach"] is None


def test_without_the_filter_the_same_calls_are_not_eperm(no_leaks: None) -> None:
    """The EPERMs above come from the filter: with seccomp off these calls work."""
    r = probe(SandboxSpec(seccomp="off", user_counters={}), STATUS, """
        L = ctypes.c_long
        libc.syscall.restype = L
        out["keyctl"] = sys_err(libc.syscall(L(250), L(0), L(-3), L(1)))
        out["unshare_user"] = sys_err(libc.syscall(L(272), L(0x10000000)))  # the last check
    """)
    assert r["status"]["Seccomp"] == "0"
    assert r["keyctl"] != "EPERM"
    assert r["unshare_user"] is None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid can reach and write (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nsx-shared-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_setuid_binary_gains_nothing(no_leaks: None, shared_dir: Path) -> None:
    """A binary setuid to the sandbox's root, run by another sandbox user, stays that user.

    The first sandbox runs as its uid 0 (a subordinate uid outside) and makes
    the setuid copy of cat; the second runs as its uid 1000 and executes it.
    """
    own_uid, own_gid = os.getuid(), os.getgid()
    if own_uid == 0:
        outside_root = outside_root_group = 100000  # any unused id will do for real root
    else:
        subuids = subordinate_ranges(Path("/etc/subuid"), own_uid)
        subgids = subordinate_ranges(Path("/etc/subgid"), own_uid)
        if not subuids or not subgids:
            pytest.skip("a second id inside needs subordinate ids in /etc/subuid and /etc/subgid")
        outside_root, outside_root_group = subuids[0][0], subgids[0][0]
    uid_map = [f"0:{outside_root}:1", f"1000:{own_uid}:1"]
    gid_map = [f"0:{outside_root_group}:1", f"1000:{own_gid}:1"]
    shared = shared_dir
    cat = shutil.which("cat")
    assert cat is not None
    made = probe(SandboxSpec(user="root", uid_map=uid_map, gid_map=gid_map,
                             readwrite_paths=[str(shared)], private_tmp=False), f"""
        import shutil
        shutil.copy({cat!r}, {str(shared / "suid-cat")!r})
        os.chmod({str(shared / "suid-cat")!r}, 0o4755)
        out["stat"] = oct(os.stat({str(shared / "suid-cat")!r}).st_mode)
        out["uid"] = os.getuid()
    """)
    assert made["uid"] == 0 and made["stat"] == "0o104755"
    assert (shared / "suid-cat").stat().st_uid == outside_root

    r = probe(SandboxSpec(user="self", uid_map=uid_map, gid_map=gid_map,
                          readwrite_paths=[str(shared)], private_tmp=False), f"""
        import subprocess
        out["me"] = os.getuid()
        text = subprocess.run([{str(shared / "suid-cat")!r}, "/proc/self/status"],
                              capture_output=True, text=True, check=True).stdout
        status = dict(l.split(":\\t", 1) for l in text.splitlines() if ":\\t" in l)
        out["status"] = {{k: status[k].strip() for k in ("Uid", "CapPrm", "CapEff")}}
    """)
    assert r["me"] == 1000
    assert r["status"]["Uid"].split() == ["1000"] * 4  # not 0: no_new_privs
    assert r["status"]["CapPrm"] == r["status"]["CapEff"] == "0000000000000000"


def test_init_binary_cannot_be_written(no_leaks: None) -> None:
    r = probe(SandboxSpec(user="root"), """
        out["exe"] = err(os.readlink, "/proc/1/exe")
        out["open_write"] = err(lambda: os.close(os.open("/proc/1/exe", os.O_WRONLY)))
        out["open_rdwr"] = err(lambda: os.close(os.open("/proc/1/exe", os.O_RDWR)))
    """)
    # The init is not dumpable: the kernel can't even look at it. (It runs
    # from a sealed memfd copy, the runc CVE-2019-5736 lesson:
    # test_nsinit.py checks that from outside.)
    assert r["exe"] == "EACCES"
    assert r["open_write"] is not None and r["open_rdwr"] is not None


def test_only_stdio_and_given_fds_are_inherited(no_leaks: None) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)  # inheritable on purpose
    os.set_inheritable(leaked, True)
    given_r, given_w = os.pipe()
    try:
        r = probe(SandboxSpec(), """
            names = os.listdir("/proc/self/fd")
            out["fds"] = sorted(int(n) for n in names if err(os.fstat, int(n)) is None)
        """, pass_fds=[given_w])
    finally:
        for fd in (leaked, given_r, given_w):
            os.close(fd)
    assert r["fds"] == sorted({0, 1, 2, given_w})


def test_init_runs_from_the_sealed_memfd(no_leaks: None) -> None:
    """Seen from outside (inside, /proc/1/exe is unreadable: the init is not dumpable)."""
    if os.geteuid() != 0:
        pytest.skip("the init is not dumpable: only root may read its /proc/<pid>/exe")
    async def main() -> str:
        proc = await spawn(SandboxSpec(), ["sleep", "30"])
        try:
            return os.readlink(f"/proc/{proc.pid}/exe")
        finally:
            proc.kill()
            await proc.wait()
            proc.close_pipes()
    assert run(main()).startswith("/memfd:nsinit")
