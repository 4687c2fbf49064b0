"""Resource limits: a cgroup per sandbox, on the real hierarchies of this host.

Memory, pids and cpu are enforced wherever this host offers them (cgroup v1
here, v2 on most hosts); the v2 placement, CLONE_INTO_CGROUP, cgroup.kill
and cleanup run for real on the cgroup2 mount. A fake cgroupfs in a tmp dir
checks the v2 controller files on top of that, never instead.

Run unprivileged only with a delegated subtree (tests/delegate_cgroups.sh);
without one the tests that need cgroups skip, or fail when
NSPROV_REQUIRE_CGROUPS=1 (as in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nsprovisioner import PIPE, SandboxError, SandboxSpec, spawn
from nsprovisioner.cgroup_layout import (
    SERVER_LEAF,
    group_name,
    parent_directory,
    sweep_stale_cgroups,
)
from nsprovisioner.cgroupfs import (
    CgroupHost,
    Hierarchy,
    current_host,
    pid_namespace_id,
    process_start_time,
)
from nsprovisioner.cgroups import create_cgroup
from nsprovisioner.process import SandboxProcess
from nsprovisioner.sandbox_cgroup import CgroupDir, SandboxCgroup

from .cgroupfs_fake import FakeCgroupfs
from .conftest import SLOWDOWN, run

spawn_module = importlib.import_module("nsprovisioner.spawn")
HOST = CgroupHost.detect()
MiB = 1024 * 1024
LIMITS = SandboxSpec(memory_limit="64M", pids_limit=20, cpu_limit=0.5)


def _enforceable() -> str | None:
    """Why this host can't run the limit tests, or None."""
    try:
        cgroup = create_cgroup(LIMITS, "probe")
    except SandboxError as e:
        return str(e)
    if cgroup is None:
        return "no cgroup can be created"
    cgroup.kill_and_remove()
    return None


def _need(reason: str | None) -> None:
    if reason is None:
        return
    message = f"{reason} (as non-root, delegate a subtree: tests/delegate_cgroups.sh)"
    if os.environ.get("NSPROV_REQUIRE_CGROUPS") == "1":
        pytest.fail(message)
    pytest.skip(message)


CANT_LIMIT = _enforceable()


def _v2_writable() -> bool:
    if HOST.v2 is None:
        return False
    cgroup = create_cgroup(SandboxSpec(), "probe", host=CgroupHost(v2=HOST.v2))
    if cgroup is not None:
        cgroup.kill_and_remove()
    return cgroup is not None


V2_WRITABLE = _v2_writable()


def our_groups(pid: int | None = None) -> list[tuple[Hierarchy, str]]:
    """The group directories of `pid` (default: this process) in every hierarchy.

    Not this process's group while it holds only the leaf that cgroup v2 made
    this process move into (cgroups.py): that lives as long as the process.
    """
    found = groups_named(group_name(pid))
    if pid is None:
        found = [(h, g) for h, g in found if set(subdirs(g)) != {SERVER_LEAF}]
    return found


def subdirs(group: str) -> list[str]:
    return [e.name for e in os.scandir(group) if e.is_dir()]


def groups_named(prefix: str) -> list[tuple[Hierarchy, str]]:
    found = []
    for h in ([HOST.v2] if HOST.v2 else []) + HOST.v1:
        parent = parent_directory(h, "auto")
        if parent and os.path.isdir(parent):
            found += [(h, os.path.join(parent, n)) for n in os.listdir(parent)
                      if n.startswith(prefix)]
    return found


@pytest.fixture
def no_cgroup_left() -> Iterator[None]:
    """Fail (after removing them) when a test leaves cgroups of this process behind."""
    yield
    left = our_groups()
    for h, group in left:
        dirs = [CgroupDir(os.path.join(group, n), h) for n in subdirs(group) if n != SERVER_LEAF]
        SandboxCgroup(HOST, dirs, [group]).kill_and_remove()
    assert not left, f"cgroups left behind: {[g for _, g in left]}"


async def start(spec: SandboxSpec, code: str, **kwargs: object) -> SandboxProcess:
    return await spawn(spec, [sys.executable, "-c", textwrap.dedent(code)], stdout=PIPE,
                       **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(proc: SandboxProcess) -> AsyncIterator[SandboxProcess]:
    """The sandbox, killed and reaped on the way out whatever the test did."""
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        proc.close_pipes()


async def finish(proc: SandboxProcess) -> tuple[int, str]:
    assert proc.stdout is not None
    out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
    code = await proc.wait()
    proc.close_pipes()
    return code, out.decode()


def python_in(spec: SandboxSpec, code: str) -> tuple[int, str, dict[str, float], int]:
    """Run code in a sandbox: exit status, stdout, final usage and OOM kills of its cgroup."""
    seen: dict[str, object] = {}

    def at_exit(proc: SandboxProcess) -> None:
        # the provisioner reads these here, before the cgroup goes
        assert proc.cgroup is not None
        seen["oom"] = proc.cgroup.oom_kill_count()
        seen["usage"] = proc.cgroup.usage()

    async def go() -> tuple[int, str]:
        proc = await start(spec, code)
        proc.add_exit_callback(at_exit)
        return await finish(proc)

    status, out = run(go())
    usage = seen["usage"]
    oom = seen["oom"]
    assert isinstance(usage, dict) and isinstance(oom, int)
    return status, out, usage, oom


# ---- limits, through spawn() -------------------------------------------------------

MEMORY_BOMB = """
    chunks = []
    for _ in range(64):                     # up to 1 GiB, 16 MiB at a time
        chunks.append(b"\\1" * (16 << 20))  # written, so really resident
    print("survived", flush=True)
"""


def test_memory_bomb_is_oom_killed_and_counted(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    status, out, _, oom = python_in(SandboxSpec(memory_limit="64M"), MEMORY_BOMB)
    assert "survived" not in out
    assert status == 128 + 9, "the OOM killer's SIGKILL, reported by the init"
    assert oom >= 1
    # the host is fine: this process is alive and the next sandbox starts at once
    status, out, _, oom = python_in(SandboxSpec(memory_limit="64M"), "print('fine')")
    assert (status, out, oom) == (0, "fine\n", 0)


def test_usage_reports_memory_pids_and_cpu(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> dict[str, float]:
        proc = await start(LIMITS, """
            import sys, time
            data = b"\\1" * (32 << 20)
            t = time.process_time() + 0.2
            while time.process_time() < t: pass
            print("ready", flush=True)
            sys.stdin.read()
        """, stdin=PIPE)
        async with running(proc):
            assert proc.stdout and proc.stdin and proc.cgroup
            await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
            usage = proc.cgroup.usage()
            proc.stdin.close()
            await proc.wait()
        return usage

    usage = run(go())
    assert 32 * MiB < usage["memory_bytes"] < 64 * MiB
    assert usage["pids"] == 2  # the init and python
    assert 0.15 < usage["cpu_seconds"] < 5


FORK_BOMB = """
    import os, subprocess, time
    kids = []
    try:
        while len(kids) < 1000:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            kids.append(pid)
    except BlockingIOError:
        stopped = "EAGAIN"
    print(len(kids), stopped, flush=True)
    for pid in kids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    # usable again once the bomb is gone
    print(subprocess.run(["echo", "usable"], capture_output=True, text=True).stdout, end="")
"""


def test_fork_bomb_stops_at_pids_limit_and_sandbox_stays_usable(
        no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    status, out, usage, _ = python_in(SandboxSpec(pids_limit=16), FORK_BOMB)
    forked, stopped, usable = out.split()
    assert status == 0, out
    assert stopped == "EAGAIN"
    assert usage["pids_limit_hits"] >= 1, usage  # what JupyterLab's status item reports
    assert int(forked) == 16 - 2, "the init and python count too"
    assert usable == "usable"


def test_shell_fork_bomb_is_contained_and_killed(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> tuple[float, int, list[str]]:
        bomb = "b() { b | b & }; b; sleep 100"
        proc = await spawn(SandboxSpec(pids_limit=32), ["bash", "-c", bomb],
                           stderr=subprocess.DEVNULL)
        async with running(proc):
            assert proc.cgroup is not None
            await asyncio.sleep(1.0)
            pids = proc.cgroup.usage()["pids"]
            paths = list(proc.cgroup.paths)
            proc.kill()
            return pids, await proc.wait(), paths

    pids, status, paths = run(go())
    assert 3 < pids <= 32
    assert status == -9
    assert not [p for p in paths if os.path.exists(p)]


CPU_BURN = """
    import os, sys, time
    start = time.monotonic()
    for _ in range(2):                      # two processes: the limit is for the sandbox
        if os.fork() == 0:
            while time.monotonic() - start < 2.0:
                pass
            os._exit(0)
    os.wait(); os.wait()
    wall = time.monotonic() - start
    t = os.times()
    print((t.children_user + t.children_system) / wall)
"""


def test_cpu_limit_half_a_core(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs to tell a limit of 0.5 from a busy host")
    idle0, t0 = host_idle_seconds(), time.monotonic()
    status, out, usage, _ = python_in(SandboxSpec(cpu_limit=0.5), CPU_BURN)
    wall = time.monotonic() - t0
    idle = (host_idle_seconds() - idle0) / wall  # CPUs the host left unused meanwhile
    assert status == 0, out
    inside = float(out)
    counted = usage["cpu_seconds"] / wall  # what the cgroup counted, over the whole start
    print(f"cpu_limit=0.5: cpu/wall inside {inside:.3f}, by the cgroup {counted:.3f}, "
          f"host idle {idle:.2f} CPUs")
    # never more than the limit, however idle the host
    assert inside <= 0.6 and counted <= 0.6
    # and no less, unless other jobs kept the CPUs busy: with half a CPU idle
    # beside it, a sandbox below 0.4 was held back by a limit set too low
    if idle >= 0.5:
        assert inside >= 0.4
        # the wall time here includes start and exit, which a slow machine stretches
        assert counted >= 0.35 / SLOWDOWN


def host_idle_seconds() -> float:
    """CPU-seconds all CPUs spent idle (or waiting for I/O) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def test_cgroup_namespace_root_is_the_sandbox_cgroup(no_leaks: None,
                                                     no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> tuple[str, str, SandboxCgroup]:
        proc = await spawn(LIMITS, ["sh", "-c", "cat /proc/self/cgroup; read x"], stdout=PIPE,
                           stdin=PIPE)
        assert proc.stdout is not None and proc.stdin is not None and proc.cgroup is not None
        try:
            inside = await asyncio.get_running_loop().run_in_executor(
                None, proc.stdout.read, 4096)
            outside = Path(f"/proc/{proc.pid}/cgroup").read_text()
        finally:
            proc.stdin.close()
            await finish(proc)
        return inside.decode(), outside, proc.cgroup

    inside, outside, cgroup = run(go())
    assert all(line.endswith(":/") for line in inside.splitlines()), inside
    if HOST.v2 is not None:
        assert "0::/" in inside.splitlines()
    # from outside, the init is in the sandbox's own directory of every hierarchy used
    for d in cgroup.dirs:
        names = "" if d.version == 2 else ",".join(sorted(d.hierarchy.controllers))
        line = next(x for x in outside.splitlines()
                    if ",".join(sorted(x.split(":")[1].split(","))) == names)
        assert line.split(":", 2)[2] == d.hierarchy.cgroup_path(d.path)


def test_limit_files_hold_the_configured_values(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    cgroup = create_cgroup(SandboxSpec(memory_limit="96M", pids_limit=7, cpu_limit=1.5), "x")
    assert cgroup is not None
    try:
        values = {}
        for d in cgroup.dirs:
            for f in os.listdir(d.path):
                if f in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max",
                         "cpu.cfs_quota_us", "cpu.cfs_period_us", "memory.swap.max",
                         "memory.memsw.limit_in_bytes"):
                    values[f] = Path(d.path, f).read_text().strip()
    finally:
        cgroup.kill_and_remove()
    assert values.get("memory.max", values.get("memory.limit_in_bytes")) == str(96 * MiB)
    assert values.get("memory.memsw.limit_in_bytes", str(96 * MiB)) == str(96 * MiB)
    assert values.get("memory.swap.max", "0") == "0"
    assert values["pids.max"] == "7"
    assert values.get("cpu.max", f"{values.get('cpu.cfs_quota_us')} "
                      f"{values.get('cpu.cfs_period_us')}") == "150000 100000"


@pytest.mark.parametrize("readonly_root", [True, False])
def test_limits_cant_be_raised_from_inside(readonly_root: bool, no_leaks: None,
                                           no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    spec = SandboxSpec(memory_limit="64M", pids_limit=20, readonly_root=readonly_root)
    code = """
        import errno, sys
        for path in sys.stdin.read().split():
            try:
                with open(path, "w") as f:
                    f.write("max")
                print("raised", path)
            except OSError as e:
                print("refused", errno.errorcode[e.errno])
    """

    async def go() -> tuple[str, dict[str, str]]:
        proc = await start(spec, code, stdin=PIPE)
        async with running(proc):
            assert proc.cgroup is not None and proc.stdin is not None
            files = [os.path.join(d.path, f) for d in proc.cgroup.dirs
                     for f in ("memory.max", "memory.limit_in_bytes", "pids.max")
                     if os.path.exists(os.path.join(d.path, f))]
            assert files
            values: dict[str, str] = {}
            # read when the sandbox has exited, before its cgroup goes
            proc.add_exit_callback(
                lambda _: values.update({f: Path(f).read_text().strip() for f in files}))
            proc.stdin.write(" ".join(files).encode())
            proc.stdin.close()
            status, out = await finish(proc)
            assert status == 0, out
            return out, values

    out, values = run(go())
    assert "raised" not in out, out
    assert values and all(v in (str(64 * MiB), "20") for v in values.values()), values


# ---- cleanup ---------------------------------------------------------------------------

def test_no_cgroup_left_after_normal_exit(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> list[str]:
        proc = await start(LIMITS, "print('bye')", name="kernel-1")
        assert proc.cgroup is not None
        assert all(os.path.basename(p) == "kernel-1" for p in proc.cgroup.paths)
        paths = list(proc.cgroup.paths)
        assert all(os.path.isdir(p) for p in paths)
        await finish(proc)
        return paths

    paths = run(go())
    assert not [p for p in paths if os.path.exists(p)]
    assert not our_groups(), "the per-server group goes with its last sandbox"


def test_kill_and_remove_kills_everything_inside(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> tuple[int, list[str]]:
        proc = await spawn(LIMITS, ["sh", "-c", "sleep 100 & setsid sleep 100 & sleep 100"])
        async with running(proc):
            assert proc.cgroup is not None
            paths = list(proc.cgroup.paths)
            await asyncio.sleep(0.2)
            proc.cgroup.kill_and_remove()
            proc.cgroup.kill_and_remove()  # idempotent
            return await asyncio.wait_for(proc.wait(), 5), paths

    status, paths = run(go())
    assert status == -9
    assert not [p for p in paths if os.path.exists(p)]


def test_no_cgroup_left_when_the_server_exits_with_sandboxes_running(
        no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    server = textwrap.dedent("""
        import asyncio
        from nsprovisioner import SandboxSpec, spawn
        async def main():
            proc = await spawn(SandboxSpec(pids_limit=10), ["sh", "-c", "sleep 100 & sleep 100"])
            print(" ".join(proc.cgroup.paths), flush=True)
        asyncio.run(main())  # and exit, without waiting for the sandbox
    """)
    result = subprocess.run([sys.executable, "-c", server], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert paths and not [p for p in paths if os.path.exists(p)]


def test_same_name_twice_gets_two_cgroups(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)

    async def go() -> tuple[list[str], list[str]]:
        first = await spawn(LIMITS, ["sleep", "100"], name="kernel-r")
        async with running(first):
            second = await spawn(LIMITS, ["sleep", "100"], name="kernel-r")
            async with running(second):
                assert first.cgroup and second.cgroup
                return first.cgroup.paths, second.cgroup.paths

    first, second = run(go())
    assert not set(first) & set(second)
    assert all(os.path.basename(p) == "kernel-r" for p in first)
    assert all(os.path.basename(p).startswith("kernel-r-") for p in second)


@pytest.mark.parametrize("step", ["write_id_maps", "cgroup_attach", "clone_grandchild",
                                  "unshare_cgroup", "init_exec"])
def test_no_cgroup_left_after_failed_launch(step: str, no_leaks: None,
                                            no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    with pytest.raises(SandboxError):
        run(spawn(LIMITS, ["true"], _fault_step=step))
    assert not our_groups()


@pytest.mark.parametrize("step, kind", [("unshare_user", "segv"), ("mount", "abrt"),
                                        ("init_fork", "segv"),
                                        ("unshare_namespaces", "memory")])
def test_no_cgroup_left_after_a_stage_crashed(step: str, kind: str, no_leaks: None,
                                              no_cgroup_left: None) -> None:
    """A stage killed by a signal or by its cgroup's memory limit (64M: the
    stage touches up to 256 MiB) takes nothing of the server's with it."""
    _need(CANT_LIMIT)
    with pytest.raises(SandboxError, match="killed by SIG"):
        run(spawn(LIMITS, ["true"], _fault_step=step, _fault_kind=kind))
    assert not our_groups()


# ---- cgroup v2 placement on the real cgroup2 mount -----------------------------------

def v2_only_host() -> CgroupHost:
    assert HOST.v2 is not None
    return CgroupHost(v2=HOST.v2, v1=[])


@pytest.fixture
def v2_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """spawn() sees only the cgroup2 mount; yields attach()'s placed_by_clone values."""
    _need(None if V2_WRITABLE else "the caller's cgroup2 cgroup is not writable")
    placed: list[bool] = []
    host = v2_only_host()

    def create(spec: SandboxSpec, name: str | None) -> SandboxCgroup | None:
        cgroup = create_cgroup(spec, name, host=host)
        if cgroup is not None:
            attach = cgroup.attach

            def record(pid: int, *, placed_by_clone: bool) -> None:
                placed.append(placed_by_clone)
                attach(pid, placed_by_clone=placed_by_clone)
            cgroup.attach = record  # type: ignore[method-assign]
        return cgroup

    monkeypatch.setattr(spawn_module, "create_cgroup", create)
    yield placed


def test_v2_clone_into_cgroup_places_the_sandbox(v2_only: list[bool], no_leaks: None,
                                                 no_cgroup_left: None) -> None:
    async def go() -> tuple[str, str, list[int], int]:
        proc = await spawn(SandboxSpec(), ["sh", "-c", "sleep 100 & sleep 100"])
        async with running(proc):
            assert proc.cgroup is not None and proc.cgroup.v2_dir is not None
            v2 = proc.cgroup.v2_dir
            line = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()[-1]
            # until sh has started both sleeps (slow in a VM without KVM)
            deadline = time.monotonic() + 10 * SLOWDOWN
            while True:
                procs = [int(p) for p in Path(v2.path, "cgroup.procs").read_text().split()]
                if len(procs) >= 4 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            proc.cgroup.kill_and_remove()  # cgroup.kill: the init and everything under it
            return line, v2.hierarchy.cgroup_path(v2.path), procs, await proc.wait()

    line, path, procs, status = run(go())
    assert v2_only == [True], "clone3 with CLONE_INTO_CGROUP placed the Child"
    assert line == f"0::{path}"
    assert len(procs) == 4  # the init, sh, and two sleeps
    assert status == -9


def test_v2_without_clone_into_cgroup_attach_moves_the_child(
        v2_only: list[bool], monkeypatch: pytest.MonkeyPatch, no_leaks: None,
        no_cgroup_left: None) -> None:
    create = spawn_module.create_cgroup

    def without_fd(spec: SandboxSpec, name: str | None) -> SandboxCgroup | None:
        cgroup = create(spec, name)
        assert isinstance(cgroup, SandboxCgroup)
        os.close(cgroup.clone_fd)  # as on a kernel before 5.7
        cgroup.clone_fd = -1
        return cgroup

    monkeypatch.setattr(spawn_module, "create_cgroup", without_fd)

    async def go() -> tuple[str, str]:
        proc = await spawn(SandboxSpec(), ["sleep", "100"])
        async with running(proc):
            assert proc.cgroup is not None and proc.cgroup.v2_dir is not None
            line = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()[-1]
            path = proc.cgroup.v2_dir.hierarchy.cgroup_path(proc.cgroup.v2_dir.path)
        return line, path

    line, path = run(go())
    assert v2_only == [False]
    assert line == f"0::{path}"


def test_strict_limit_on_v2_without_the_controller_fails(
        v2_only: list[bool], no_leaks: None, no_cgroup_left: None) -> None:
    assert HOST.v2 is not None
    if "memory" in HOST.v2.controllers:
        pytest.skip("this cgroup2 mount has the memory controller")
    with pytest.raises(SandboxError) as e:
        run(spawn(SandboxSpec(memory_limit="64M"), ["true"]))
    message = str(e.value)
    assert "memory_limit needs the memory controller" in message
    assert HOST.v2.mount in message
    assert "Fix:" in message and "strict = false" in message


def test_non_strict_limit_on_v2_without_the_controller_warns_once_and_starts(
        v2_only: list[bool], caplog: pytest.LogCaptureFixture, no_leaks: None,
        no_cgroup_left: None) -> None:
    assert HOST.v2 is not None
    if "memory" in HOST.v2.controllers:
        pytest.skip("this cgroup2 mount has the memory controller")
    caplog.set_level(logging.WARNING, "nsprovisioner")
    status, out, _, _ = python_in(SandboxSpec(memory_limit="64M", strict=False), "print(1)")
    assert (status, out) == (0, "1\n")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "memory_limit needs the memory controller" in warnings[0].getMessage()
    assert v2_only == [True], "the sandbox still got its cgroup2 directory"


# ---- sweep -----------------------------------------------------------------------------

def test_sweep_kills_and_removes_groups_of_dead_servers(no_leaks: None,
                                                        no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    dead = subprocess.Popen(["sleep", "0.1"])
    started = process_start_time(dead.pid)
    dead.wait()
    stale = group_name().rsplit("-", 3)
    stale_name = f"{stale[0]}-{dead.pid}-{started}-{stale[3]}"
    # a leftover sandbox with a process still in it, in every hierarchy used
    orphan = subprocess.Popen(["sleep", "100"])
    made = []
    try:
        for h in ([HOST.v2] if V2_WRITABLE and HOST.v2 else []) + HOST.v1:
            parent = parent_directory(h, "auto")
            assert parent is not None
            path = os.path.join(parent, stale_name, "kernel-x")
            os.makedirs(path)
            made.append(path)
            Path(path, "cgroup.procs").write_text(str(orphan.pid))
        live = create_cgroup(SandboxSpec(), "alive")  # this server's own: not stale
        assert live is not None
        removed = sweep_stale_cgroups()
        assert orphan.wait(timeout=5) == -9
        assert all(os.path.isdir(p) for p in live.paths)
        live.kill_and_remove()
    finally:
        orphan.kill()
        orphan.wait()
        for path in made:
            for d in (path, os.path.dirname(path)):
                if os.path.isdir(d):
                    os.rmdir(d)
    # (and the leftovers of earlier runs that were killed, if any)
    assert set(made + [os.path.dirname(p) for p in made]) <= set(removed)


# ---- the CLI -------------------------------------------------------------------------

def cli(*args: str) -> tuple[int, str, str]:
    """`nsprovisioner run ARGS`: status, stdout, stderr; fails if it left a cgroup."""
    proc = subprocess.Popen([sys.executable, "-m", "nsprovisioner.cli", "run", *args],
                            stdout=PIPE, stderr=PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    left = groups_named(f"nsprov-{os.geteuid()}-{proc.pid}-")
    assert not left, f"the CLI left cgroups: {left}"
    return proc.returncode, out, err


def test_cli_memory_limit_kills_a_memory_bomb(no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    status, out, err = cli("--memory-limit", "64M", "--", sys.executable, "-c",
                           textwrap.dedent(MEMORY_BOMB))
    assert status == 128 + 9, err
    assert "survived" not in out


def test_cli_pids_and_cpu_limits(no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    status, out, err = cli("--pids-limit", "16", "--cpu-limit", "0.5", "--", sys.executable,
                           "-c", textwrap.dedent(FORK_BOMB))
    assert status == 0, err
    assert out.split() == ["14", "EAGAIN", "usable"]


def test_cli_limit_that_cant_be_enforced_strict_and_not(no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    # a cgroup_parent below an interface file: no hierarchy can make it
    status, out, err = cli("--memory-limit", "64M", "--cgroup-parent", "/cgroup.procs/x",
                           "--", "true")
    assert status == 125
    assert re.search(r"memory_limit needs the memory controller, but the cgroup "
                     r"\S+cgroup.procs/x can't be created", err), err
    assert "Delegate=yes" in err
    status, out, err = cli("--memory-limit", "64M", "--cgroup-parent", "/cgroup.procs/x",
                           "--no-strict", "--", "echo", "ran")
    assert (status, out) == (0, "ran\n"), err
    assert err.count("without some limits") == 1


def test_undelegated_user_gets_the_fix_and_starts_without_limits(
        no_leaks: None, no_cgroup_left: None) -> None:
    """A user whose cgroup root owns (a login session without Delegate=yes)."""
    if os.geteuid() == 0 or CANT_LIMIT is None:
        reason = "only for a user without a delegated cgroup"
        if os.environ.get("NSPROV_EXPECT_UNDELEGATED") == "1":
            pytest.fail(f"{reason}, and CI runs this as one (scripts/vm-guest.sh)")
        pytest.skip(reason)
    with pytest.raises(SandboxError) as e:
        run(spawn(SandboxSpec(memory_limit="64M"), ["true"]))
    message = str(e.value)
    assert "memory_limit needs the memory controller" in message, message
    assert "Delegate=yes" in message, "the documented fix (docs/troubleshooting.md)"
    assert not our_groups(), "a failed start leaves no group"

    async def go() -> tuple[int, str]:
        proc = await start(SandboxSpec(), "print('ok')")
        async with running(proc):
            return await finish(proc)

    assert run(go()) == (0, "ok\n")


def test_no_limits_never_block_a_start(no_leaks: None, no_cgroup_left: None) -> None:
    async def go() -> tuple[int, str]:
        # a parent no hierarchy can make: no cgroup at all, and still a sandbox
        proc = await start(SandboxSpec(cgroup_parent="/cgroup.procs/x"), "print('ok')")
        async with running(proc):
            assert proc.cgroup is None
            return await finish(proc)

    assert run(go()) == (0, "ok\n")


# ---- what create_cgroup() keeps between sandboxes -------------------------------------

def mountinfo_fds() -> list[int]:
    own = f"/proc/{os.getpid()}/mountinfo"
    return [int(n) for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}") and os.readlink(f"/proc/self/fd/{n}") == own]


def test_cached_host_is_what_detect_finds() -> None:
    assert current_host() == CgroupHost.detect()
    assert current_host() == CgroupHost.detect(), "and again, from the cache"


def test_sandboxes_follow_the_server_into_another_cgroup(no_leaks: None,
                                                         no_cgroup_left: None) -> None:
    _need(None if V2_WRITABLE else "the caller's cgroup2 cgroup is not writable")
    # where this process is now: a limit may have moved it into its leaf (cgroups.py)
    before = CgroupHost.detect().v2
    assert before is not None and before.own_path is not None
    start = before.directory(before.own_path)
    assert start is not None
    current_host()  # cached while the server is still in its first cgroup
    moved = os.path.join(start, f"nsprov-test-moved-{os.getpid()}")
    os.mkdir(moved)
    try:
        Path(moved, "cgroup.procs").write_text(str(os.getpid()))
        try:
            assert current_host().v2 == dataclasses.replace(
                before, own_path=before.cgroup_path(moved))
            cgroup = create_cgroup(SandboxSpec(), "k")
            assert cgroup is not None and cgroup.v2_dir is not None
            assert cgroup.v2_dir.path == os.path.join(moved, group_name(), "k")
            cgroup.kill_and_remove()
        finally:
            Path(start, "cgroup.procs").write_text(str(os.getpid()))
        assert current_host().v2 == before, "back where it started"
    finally:
        # with the leaf a root server's default pids cap moved it into (cgroups.py)
        for d in sorted((d for d, _, _ in os.walk(moved)), reverse=True):
            os.rmdir(d)


MOVE_CGROUP2 = """
import ctypes, os, sys
from nsprovisioner.cgroupfs import CgroupHost, current_host

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE, MNT_DETACH = 0x20000, 0x4000, 1 << 18, 2

def check(rc):
    if rc != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

def move_cgroup2(to):
    while (v2 := CgroupHost.detect().v2) is not None:
        check(libc.umount2(v2.mount.encode(), MNT_DETACH))
    check(libc.mount(b"cgroup2", to.encode(), b"cgroup2", 0, None))

seen = [current_host().v2.mount]  # the cache watches this mount namespace
check(libc.unshare(CLONE_NEWNS))
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))  # nothing reaches the host
move_cgroup2(sys.argv[1])
seen.append(current_host().v2.mount)  # a mount namespace of its own: a fresh read
move_cgroup2(sys.argv[2])
seen.append(current_host().v2.mount)  # the same namespace: poll() reports the change
print(" ".join(seen))
"""


def test_cached_host_sees_new_mounts_and_a_new_mount_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or HOST.v2 is None:
        pytest.skip("moving the cgroup2 mount in a private mount namespace needs root")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    out = subprocess.run([sys.executable, "-c", MOVE_CGROUP2, str(first), str(second)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == [HOST.v2.mount, str(first), str(second)]


def test_cached_host_trusts_no_fd_closed_behind_its_back() -> None:
    current_host()
    [fd] = mountinfo_fds()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, fd)  # closed by someone else, its number reused
    os.close(devnull)
    try:
        assert current_host() == CgroupHost.detect()
        assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/null", "not ours to close"
        assert len(mountinfo_fds()) == 1, "a new fd to watch"
    finally:
        os.close(fd)


def test_a_forked_server_names_its_group_after_itself() -> None:
    assert group_name() == group_name()  # cached from here on
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, group_name().encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        name = os.read(r, 200).decode()
        expected = f"nsprov-{os.geteuid()}-{pid}-{process_start_time(pid)}-{pid_namespace_id()}"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert name == expected


# ---- controller files against a fake cgroupfs (a supplement) ----------------------------

def test_fake_v2_enables_controllers_moves_the_server_and_writes_limits(
        tmp_path: Path) -> None:
    fake = FakeCgroupfs(tmp_path, own="/user.slice/app", controllers="cpu memory pids io",
                        delegated="cpu memory pids")
    fake.add_process("/user.slice/app", os.getpid())
    cgroup = create_cgroup(LIMITS, "k1", host=fake)
    assert cgroup is not None
    app = tmp_path / "user.slice/app"
    group = app / group_name()
    sandbox = group / "k1"
    try:
        assert cgroup.paths == [str(sandbox)]
        # the no-internal-processes rule: the server left app for its own leaf
        assert fake.pids("/user.slice/app") == []
        assert fake.pids(f"/user.slice/app/{group_name()}/{SERVER_LEAF}") == [os.getpid()]
        assert set((app / "cgroup.subtree_control").read_text().split()) == {
            "cpu", "memory", "pids"}
        assert set((group / "cgroup.subtree_control").read_text().split()) == {
            "cpu", "memory", "pids"}
        assert (sandbox / "memory.max").read_text() == str(64 * MiB)
        assert (sandbox / "memory.swap.max").read_text() == "0"
        assert (sandbox / "pids.max").read_text() == "20"
        assert (sandbox / "cpu.max").read_text() == "50000 100000"
        # the second sandbox finds the same parent although the server moved
        fake.own = f"/user.slice/app/{group_name()}/{SERVER_LEAF}"
        second = create_cgroup(LIMITS, "k2", host=fake)
        assert second is not None and second.paths == [str(group / "k2")]
        second.kill_and_remove()
        # and so does a process another server started (it is in that server's leaf)
        fake.own = f"/user.slice/app/nsprov-0-1-2-3/{SERVER_LEAF}"
        assert fake.v2 is not None
        assert parent_directory(fake.v2, "auto") == str(app)
        (sandbox / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        assert cgroup.oom_kill_count() == 1
    finally:
        cgroup.kill_and_remove()
    assert fake.killed == [str(group / "k2"), str(sandbox)], "cgroup.kill was written"
    assert not sandbox.exists()
    assert cgroup.oom_kill_count() == 1, "counted before removal, kept after"


def test_fake_v2_controller_not_delegated_strict_and_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeCgroupfs(tmp_path, own="/srv", controllers="cpu memory pids", delegated="pids")
    with pytest.raises(SandboxError) as e:
        create_cgroup(SandboxSpec(memory_limit="64M", pids_limit=5), "k", host=fake)
    assert f"the memory controller is not delegated to {tmp_path}/srv" in str(e.value)
    assert "Delegate=yes" in str(e.value)
    assert not (tmp_path / "srv" / group_name()).exists(), "nothing left after the error"

    caplog.set_level(logging.WARNING, "nsprovisioner")
    cgroup = create_cgroup(SandboxSpec(memory_limit="64M", pids_limit=5, strict=False), "k",
                           host=fake)
    assert cgroup is not None
    sandbox = tmp_path / "srv" / group_name() / "k"
    try:
        assert (sandbox / "pids.max").read_text() == "5"
        assert not (sandbox / "memory.max").exists()
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    finally:
        cgroup.kill_and_remove()


def test_fake_v2_other_processes_in_the_parent_are_named(tmp_path: Path) -> None:
    fake = FakeCgroupfs(tmp_path, own="/app", controllers="memory", delegated="memory")
    fake.add_process("/app", os.getpid())
    fake.add_process("/app", 4242)  # another process of the user's session
    with pytest.raises(SandboxError) as e:
        create_cgroup(SandboxSpec(memory_limit="64M"), "k", host=fake)
    assert "holds processes (4242)" in str(e.value)
    assert "no-internal-processes" in str(e.value)


def test_fake_v2_threaded_controllers_never_go_where_processes_are(tmp_path: Path) -> None:
    """Linux would take +pids +cpu here and make /app a thread root (found on a real v2 host)."""
    fake = FakeCgroupfs(tmp_path, own="/app", controllers="cpu memory pids",
                        delegated="cpu memory pids")
    fake.add_process("/app", os.getpid())
    fake.add_process("/app", 4242)
    with pytest.raises(SandboxError) as e:
        create_cgroup(SandboxSpec(pids_limit=5, cpu_limit=0.5), "k", host=fake)
    assert "holds processes (4242)" in str(e.value)
    assert (tmp_path / "app/cgroup.subtree_control").read_text() == ""
    fake.add_process("/", 4242)  # the session's other process goes: now the server can leave
    cgroup = create_cgroup(SandboxSpec(pids_limit=5, cpu_limit=0.5), "k", host=fake)
    assert cgroup is not None
    try:
        assert (tmp_path / "app" / group_name() / "k" / "pids.max").read_text() == "5"
    finally:
        cgroup.kill_and_remove()


def test_fake_v2_without_limits_leaves_the_parent_alone(tmp_path: Path) -> None:
    fake = FakeCgroupfs(tmp_path, own="/app", controllers="memory pids", delegated="memory pids")
    fake.add_process("/app", os.getpid())
    # (nproc_limit's pids.max default, which a root server's sandboxes get, is a limit)
    cgroup = create_cgroup(SandboxSpec(nproc_limit=None), "k", host=fake)
    assert cgroup is not None
    try:
        assert fake.pids("/app") == [os.getpid()], "no limit: the server is not moved"
        assert (tmp_path / "app/cgroup.subtree_control").read_text() == ""
    finally:
        cgroup.kill_and_remove()
    assert not (tmp_path / "app" / group_name()).exists()


def test_fake_v2_sweep_keeps_live_and_foreign_groups(tmp_path: Path) -> None:
    fake = FakeCgroupfs(tmp_path, own="/", controllers="", delegated="")
    me = group_name()
    uid, _, _, pidns = me.removeprefix("nsprov-").split("-")
    dead = f"nsprov-{uid}-999999999-1-{pidns}"
    other_ns = f"nsprov-{uid}-999999999-1-1"
    other_user = f"nsprov-{int(uid) + 1}-999999999-1-{pidns}"
    for name in (me, dead, other_ns, other_user, "unrelated"):
        fake.make_dir(str(tmp_path / name))
    fake.make_dir(str(tmp_path / dead / "k"))
    fake.make_dir(str(tmp_path / dead / SERVER_LEAF))
    removed = sweep_stale_cgroups(host=fake)
    assert sorted(removed) == sorted(str(tmp_path / dead / n) for n in ("k", SERVER_LEAF, ""))
    left = {e.name for e in os.scandir(tmp_path) if e.is_dir()}
    assert left == {me, other_ns, other_user, "unrelated"}
