"""The filesystem boundary: what a sandboxed command can see and write.

Each test starts real sandboxes through spawn() and runs a small Python
probe inside that reports errno names as JSON; several checks share one run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nsprovisioner import PIPE, SandboxError, SandboxSpec, mounts, spawn
from nsprovisioner.mounts import DEV_NODES, PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READONLY

from .conftest import PROBE_HELPERS, run

PRELUDE = PROBE_HELPERS + """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}

def sys_err(rc):
    return None if rc >= 0 else errno.errorcode[ctypes.get_errno()]
"""


async def probe_async(spec: SandboxSpec, *scripts: str, **kwargs: Any) -> dict[str, Any]:
    source = "".join(textwrap.dedent(s) + "\n" for s in (PRELUDE, *scripts))
    argv = [sys.executable, "-c", source + "print(json.dumps(out))"]
    proc = await spawn(spec, argv, stdout=PIPE, stderr=PIPE, **kwargs)
    assert proc.stdout is not None and proc.stderr is not None
    out, errs = await asyncio.gather(asyncio.to_thread(proc.stdout.read),
                                     asyncio.to_thread(proc.stderr.read))
    code = await proc.wait()
    proc.close_pipes()
    assert code == 0, errs.decode()
    result: dict[str, Any] = json.loads(out)
    result["stderr"] = errs.decode()
    return result


def probe(spec: SandboxSpec, *scripts: str, **kwargs: Any) -> dict[str, Any]:
    """Run the scripts (which fill the dict `out`) in a sandbox; `out` as seen outside."""
    return run(probe_async(spec, *scripts, **kwargs))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway HOME: `~` in the spec and HOME inside both point to it."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_default_layout(no_leaks: None, home: Path, workdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "outside-cwd"  # under the host's /tmp, not under cwd
    marker.write_text("host")
    r = probe(SandboxSpec(), f"""
        out["usr"] = err(write, "/usr/nsx-probe")
        out["etc"] = err(os.mkdir, "/etc/nsx-probe")
        out["cwd_write"] = err(write, "made-inside", "inside")
        out["home_write"] = err(write, os.path.expanduser("~/made-inside"), "home")
        out["cwd"] = [os.getcwd(), os.readlink("/proc/self/cwd"), os.readlink("/proc/self/root")]
        out["host_tmp_file"] = os.path.exists({str(marker)!r})
        out["tmp_write"] = err(write, "/tmp/nsx-private")
        out["var_tmp"] = os.listdir("/var/tmp") if os.path.isdir("/var/tmp") else None
        out["sys"] = err(os.mkdir, "/sys/nsx-probe")
        out["proc_sys"] = err(write, "/proc/sys/kernel/hostname", "x")
        out["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        out["dev"] = sorted(os.listdir("/dev"))
        out["dev_create"] = err(write, "/dev/nsx-probe")
        out["dev_null"] = err(write, "/dev/null")
        out["shm"] = err(write, "/dev/shm/probe")
        out["ptmx"] = err(lambda: os.close(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)))
        out["zero"] = open("/dev/zero", "rb").read(4).hex()
        out["hostname"] = os.uname().nodename
        out["mountinfo"] = read("/proc/self/mountinfo").splitlines()
    """, cwd=workdir)
    assert r["usr"] == "EROFS" and r["etc"] == "EROFS"
    assert r["cwd_write"] is None and (workdir / "made-inside").read_text() == "inside"
    assert r["home_write"] is None and (home / "made-inside").read_text() == "home"
    # the CVE-2024-21626 lesson: the cwd resolves inside the new root
    assert r["cwd"] == [str(workdir), str(workdir), "/"]
    assert r["host_tmp_file"] is False
    assert r["tmp_write"] is None and not Path("/tmp/nsx-private").exists()
    assert r["var_tmp"] in ([], None)
    assert r["sys"] == "EROFS" and r["proc_sys"] == "EROFS"
    assert r["proc_pids"] == [1, 2]  # the init and the probe: nothing of the host
    assert r["dev"] == sorted([*DEV_NODES, "pts", "ptmx", "shm", "fd", "stdin", "stdout",
                               "stderr"])
    assert r["dev_create"] == "EROFS"
    assert r["dev_null"] is None and r["shm"] is None and r["ptmx"] is None
    assert r["zero"] == "00000000"
    assert r["hostname"] == "sandbox"
    mounts = {line.split()[4]: line.split() for line in r["mountinfo"]}
    assert "ro" in mounts["/"][5].split(",")
    assert not any(m.startswith(("/oldroot", "/newroot")) for m in mounts)


def test_proc_masks(no_leaks: None) -> None:
    r = probe(SandboxSpec(), """
        out["mounts"] = [l.split()[4] + " " + l.split()[5]
                         for l in read("/proc/self/mountinfo").splitlines()]
        out["keys"] = read("/proc/keys") if os.path.exists("/proc/keys") else None
        out["acpi"] = os.listdir("/proc/acpi") if os.path.exists("/proc/acpi") else None
        out["sysrq"] = (err(write, "/proc/sysrq-trigger", "h")
                        if os.path.exists("/proc/sysrq-trigger") else None)
    """)
    mounts = dict(m.split() for m in r["mounts"])
    for name in (*PROC_MASKED_FILES, *PROC_MASKED_DIRS, *PROC_READONLY):
        if os.path.exists(f"/proc/{name}"):
            assert f"/proc/{name}" in mounts, name
    for name in PROC_READONLY:
        if os.path.exists(f"/proc/{name}"):
            assert "ro" in mounts[f"/proc/{name}"].split(","), name
    assert r["keys"] in ("", None)
    assert r["acpi"] in ([], None)
    assert r["sysrq"] in ("EROFS", None)


def test_hidden_readonly_and_more_specific_paths(no_leaks: None, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"  # like the Jupyter runtime dir
    runtime.mkdir()
    (runtime / "kernel-other.json").write_text("other kernel's key")
    (runtime / "jpserver-1.json").write_text("token")
    own = runtime / "kernel-own.json"
    own.write_text("my key")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    data = tmp_path / "data"
    (data / "scratch").mkdir(parents=True)
    (data / "input.csv").write_text("1,2")
    spec = SandboxSpec(readwrite_paths=[str(data / "scratch")],
                       readonly_paths=[str(data), str(own)],
                       hidden_paths=[str(runtime), str(secret)],
                       private_tmp=False)
    r = probe(spec, f"""
        runtime, data = {str(runtime)!r}, {str(data)!r}
        out["list_runtime"] = err(os.listdir, runtime)
        out["other"] = err(read, runtime + "/kernel-other.json")
        out["server"] = err(read, runtime + "/jpserver-1.json")
        out["own"] = read({str(own)!r})
        out["own_write"] = err(write, {str(own)!r})
        out["runtime_create"] = err(write, runtime + "/new.json")
        out["secret"] = err(read, {str(secret)!r})
        out["secret_size"] = os.stat({str(secret)!r}).st_size
        out["input"] = read(data + "/input.csv")
        out["data_write"] = err(write, data + "/input.csv")
        out["scratch_write"] = err(write, data + "/scratch/result")
    """)
    assert r["list_runtime"] == "EACCES"
    # the hidden directory is traversable (for the own file) but empty
    assert r["other"] == "ENOENT" and r["server"] == "ENOENT"
    assert r["own"] == "my key" and r["own_write"] == "EROFS"
    assert r["runtime_create"] in ("EACCES", "EROFS")
    assert r["secret"] == "EACCES" and r["secret_size"] == 0
    assert r["input"] == "1,2" and r["data_write"] == "EROFS"
    assert r["scratch_write"] is None and (data / "scratch" / "result").exists()


def test_hidden_directory_without_visible_children_is_mode_000(no_leaks: None,
                                                               tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    (hidden / "sub").mkdir(parents=True)
    r = probe(SandboxSpec(hidden_paths=[str(hidden)], private_tmp=False), f"""
        out["mode"] = oct(os.stat({str(hidden)!r}).st_mode & 0o7777)
        out["traverse"] = err(os.stat, {str(hidden / "sub")!r})
        out["chmod"] = err(os.chmod, {str(hidden)!r}, 0o755)  # its owner is the sandbox user
    """)
    assert r["mode"] == "0o0" and r["traverse"] == "EACCES" and r["chmod"] == "EROFS"


def test_binds_never_follow_a_symlink_swapped_in_after_planning(
        no_leaks: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a path became a symlink between planning and mounting, the start fails.

    Planning resolves real paths; skipping that here stands for a symlink
    swapped in by a process in another sandbox at the worst moment.
    """
    (tmp_path / "real" / "runtime").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    spec = SandboxSpec(hidden_paths=[str(tmp_path / "link" / "runtime")], readwrite_paths=(),
                       private_tmp=False)
    r = probe(spec, f"out['hidden'] = err(os.listdir, {str(tmp_path / 'real' / 'runtime')!r})")
    assert r["hidden"] == "EACCES"  # planned normally: the real path is hidden
    monkeypatch.setattr(mounts, "expand_path", lambda value, key, cwd, pins=None: value)
    with pytest.raises(SandboxError) as info:
        probe(spec, "")
    assert info.value.step == "mount" and info.value.errno == errno.ELOOP


def test_each_mount_plan_is_a_list_of_its_own(workdir: Path) -> None:
    """The parts every plan shares are made once; a caller changing its plan changes no other."""
    spec = SandboxSpec()
    first = mounts.plan_mounts(spec, str(workdir))
    expected = list(first)
    first.clear()
    assert mounts.plan_mounts(spec, str(workdir)) == expected


def test_readonly_root_off(no_leaks: None, tmp_path: Path, workdir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    spec = SandboxSpec(readonly_root=False, private_tmp=False, readonly_paths=[str(ro)])
    r = probe(spec, f"""
        out["outside"] = err(write, {str(outside / "f")!r}, "written")
        out["ro"] = err(write, {str(ro / "f")!r})
        out["sys"] = err(os.mkdir, "/sys/nsx-probe")
        out["keys"] = "/proc/keys" in read("/proc/self/mountinfo") or not os.path.exists("/proc/keys")
        out["dev"] = err(write, "/dev/nsx-probe")
    """, cwd=workdir)
    assert r["outside"] is None and (outside / "f").read_text() == "written"
    assert r["ro"] == "EROFS"
    assert r["sys"] == "EROFS" and r["keys"] is True and r["dev"] == "EROFS"


def test_without_private_tmp_only_readwrite_paths_are_writable(
        no_leaks: None, home: Path, workdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.write_text("host")
    spec = SandboxSpec(private_tmp=False, readwrite_paths=["{cwd}"])
    r = probe(spec, f"""
        out["marker"] = read({str(marker)!r})
        out["tmp_write"] = err(write, {str(tmp_path / "new")!r})
        out["home_write"] = err(write, os.path.expanduser("~/new"))
        out["cwd_write"] = err(write, "new")
    """, cwd=workdir)
    assert r["marker"] == "host"
    assert r["tmp_write"] == "EROFS" and r["home_write"] == "EROFS"
    assert r["cwd_write"] is None


def test_mounts_never_reach_the_host(no_leaks: None) -> None:
    def mountinfo() -> list[str]:
        return sorted(" ".join(line.split()[3:]) for line in
                      Path("/proc/self/mountinfo").read_text().splitlines())

    before = mountinfo()

    async def during() -> list[str]:
        proc = await spawn(SandboxSpec(), ["sh", "-c", "read line"], stdin=PIPE, stdout=PIPE)
        assert proc.stdin is not None
        await asyncio.sleep(0.2)
        seen = mountinfo()
        proc.stdin.write(b"done\n")
        proc.stdin.close()
        await proc.wait()
        proc.close_pipes()
        return seen

    assert run(during()) == before
    assert mountinfo() == before


def test_masks_cannot_be_lifted(no_leaks: None, tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "secret").write_text("secret")
    # No seccomp and no namespace counters: the locks alone must hold.
    spec = SandboxSpec(user="root", seccomp="off", hidden_paths=[str(hidden)],
                       private_tmp=True, user_counters={})
    r = probe(spec, f"""
        MNT_DETACH, MS_REMOUNT, MS_BIND = 2, 32, 4096
        CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        hidden = {str(hidden)!r}.encode()

        def attempts():
            return {{
                "umount_proc_mask": sys_err(libc.umount2(b"/proc/timer_list", MNT_DETACH)),
                "umount_hidden": sys_err(libc.umount2(hidden, MNT_DETACH)),
                "umount_proc_sys": sys_err(libc.umount2(b"/proc/sys", MNT_DETACH)),
                "remount_root_rw": sys_err(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND,
                                                      None)),
                "remount_sys_rw": sys_err(libc.mount(None, b"/sys", None,
                                                     MS_REMOUNT | MS_BIND, None)),
            }}

        out["caps"] = attempts()
        # a nested user namespace holds every capability over its own mount
        # namespace; the copied mounts are locked, so the masks still hold
        out["unshare"] = sys_err(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
        out["nested_capeff"] = [l.split()[1] for l in read("/proc/self/status").splitlines()
                                if l.startswith("CapEff")][0]
        out["nested"] = attempts()
        # a mount of its own can be undone: the failures above are the locks
        out["own_mount"] = sys_err(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None))
        out["own_umount"] = sys_err(libc.umount2(b"/tmp", 0))
        out["secret"] = err(read, {str(hidden / "secret")!r})
    """)
    for name, result in r["caps"].items():
        assert result == "EPERM", name
    assert r["unshare"] is None
    assert r["nested_capeff"] != "0000000000000000"
    assert r["nested"]["umount_proc_mask"] == "EINVAL"
    assert r["nested"]["umount_hidden"] == "EINVAL"
    assert r["nested"]["umount_proc_sys"] == "EINVAL"
    assert r["nested"]["remount_root_rw"] == "EPERM"
    assert r["nested"]["remount_sys_rw"] == "EPERM"
    assert r["own_mount"] is None and r["own_umount"] is None
    assert r["secret"] == "EACCES"


@pytest.mark.parametrize("key, value, message", [
    ("readwrite_paths", "/nonexistent/nsx", "does not exist"),
    ("readonly_paths", "relative/path", "is not an absolute path"),
    ("hidden_paths", "~/nsx-missing-{cwd}", "does not exist"),
    ("readonly_paths", "/", "is the root"),
    ("hidden_paths", "/proc/cpuinfo", "inside /proc"),
    ("readwrite_paths", "/dev/shm", "inside /dev"),
])
def test_bad_path_is_a_clear_error_before_clone(no_leaks: None, key: str, value: str,
                                                message: str) -> None:
    spec = SandboxSpec(**{key: [value]})  # type: ignore[arg-type]
    with pytest.raises(SandboxError) as info:
        run(spawn(spec, ["true"]))
    assert key in str(info.value) and repr(value) in str(info.value)
    assert message in str(info.value)
    assert info.value.step is None  # raised in Python, nothing was cloned


def test_ipython_history_and_caches_in_the_state_dir(no_leaks: None, home: Path,
                                                     workdir: Path) -> None:
    """Home's dot entries are read-only; the sandbox's state dir takes what tools write."""
    r = probe(SandboxSpec(), """
        import subprocess
        proc = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--HistoryManager.enabled=True",
                               "-c", "x = 40 + 2; print(x)"], capture_output=True, text=True)
        out["ipython"] = [proc.returncode, proc.stdout.strip(), proc.stderr]
        # matplotlib builds its font cache on first use, and warns when it
        # has to fall back to a temporary directory
        proc = subprocess.run([sys.executable, "-c",
                               "import matplotlib; matplotlib.use('Agg'); "
                               "import matplotlib.pyplot as plt; plt.plot([1, 2]); "
                               "plt.savefig('plot.png'); print(matplotlib.get_cachedir())"],
                              capture_output=True, text=True)
        out["mpl"] = [proc.returncode, proc.stdout.strip(), proc.stderr]
    """, cwd=workdir)
    code, stdout, stderr = r["ipython"]
    assert code == 0 and stdout.endswith("42"), stderr
    assert "warn" not in stderr.lower() and "warn" not in r["stderr"].lower(), stderr
    state = home / ".local/share/nsprovisioner/sandbox"
    assert list(state.glob("ipython/profile_*/history.sqlite"))
    assert not (home / ".ipython/profile_default/history.sqlite").exists()
    code, cachedir, stderr = r["mpl"]
    assert code == 0, stderr
    assert cachedir.startswith(str(state)) and "warn" not in stderr.lower(), stderr
    assert list(Path(cachedir).glob("fontlist*.json"))


def test_no_namespace_can_be_made_inside_even_without_seccomp(no_leaks: None) -> None:
    """The default per-namespace counters are 0: the second line of defence behind seccomp."""
    r = probe(SandboxSpec(user="root", seccomp="off"), """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def sys_err(rc):
            return None if rc == 0 else errno.errorcode[ctypes.get_errno()]
        out["user"] = sys_err(libc.unshare(0x10000000))
        out["net"] = sys_err(libc.unshare(0x40000000))
    """)
    assert (r["user"], r["net"]) == ("ENOSPC", "EPERM")


def test_an_interpreter_under_the_private_tmp_is_bound_back_read_only(
        no_leaks: None, tmp_path: Path) -> None:
    """A venv made under /tmp (CI systems, tools) would vanish under the private /tmp."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    tool = venv / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho ran; touch \"$0.x\" 2>/dev/null || echo read-only\n")
    tool.chmod(0o755)

    async def main() -> tuple[int, bytes]:
        proc = await spawn(SandboxSpec(readwrite_paths=()), [str(tool)], cwd="/",
                           stdout=PIPE)
        assert proc.stdout is not None
        out = proc.stdout.read()
        code = await proc.wait()
        proc.close_pipes()
        return code, out

    assert run(main()) == (0, b"ran\nread-only\n")
