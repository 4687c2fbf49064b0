"""Shared test helpers: real sandboxes, and checks that nothing leaks."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

# How much slower than an ordinary machine this one is, for the timeouts of
# kernel starts: scripts/vm-guest.sh sets it in its VM (qemu without KVM).
SLOWDOWN = float(os.environ.get("NSPROV_TEST_SLOWDOWN", "1"))

# A cell that prints "sleeping" once it runs, then runs until interrupted (60 s).
# In short sleeps: a process-directed SIGINT may be taken by one of the kernel's
# other threads, and CPython runs the handler in the main thread only once its
# blocking call returns (1 in 60 interrupts of LocalProvisioner kernels here came
# back only after a 30 s sleep); the tests that wait less than 60 s for the reply
# still fail if the interrupt doesn't reach the kernel.
INTERRUPTIBLE = "import time\nprint('sleeping', flush=True)\nfor _ in range(600): time.sleep(0.1)"

# Python source the boundary probes run inside a sandbox (a command, a CLI
# run, a kernel) before their checks: err() gives errno names instead of
# exceptions (None when the call works).
PROBE_HELPERS = """
import errno, json, os

def err(fn, *args):
    try:
        fn(*args)
        return None
    except OSError as e:
        return errno.errorcode[e.errno]

def write(path, data="x"):
    with open(path, "w") as f:
        f.write(data)

def read(path):
    with open(path) as f:
        return f.read()

def proc_status():
    return {k: v.strip() for k, _, v in (line.partition(":\\t") for line in
            read("/proc/self/status").splitlines()) if v}
"""


def stop_process(proc: subprocess.Popen[Any], timeout: float, *,
                 terminate: bool = True) -> None:
    """End a process the test started: SIGTERM (unless it is ending by itself),
    `timeout` seconds to exit, then SIGKILL; reaped in any case."""
    if terminate and proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop (the tests own their loops)."""
    return asyncio.run(coro)


def open_fds() -> set[str]:
    """This process's open fds, as 'N -> target' strings.

    Not the two that live as long as the process on purpose: the cached init
    memfd, and the /proc/self/mountinfo fd whose poll() tells cgroupfs.py that
    the mount table changed.
    """
    own_mountinfo = f"/proc/{os.getpid()}/mountinfo"
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if "memfd:nsinit" not in target and target != own_mountinfo:
                fds.add(f"{name} -> {target}")
        except FileNotFoundError:
            pass  # the fd that listed the directory
    return fds


def child_processes() -> list[str]:
    """Processes whose parent is this process (zombies included), as 'pid state comm'."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm_end = stat.rindex(")")
        fields = stat[comm_end + 2:].split()
        if int(fields[1]) == me:
            found.append(f"{entry.name} {fields[0]} {stat[stat.index('(') + 1:comm_end]}")
    return found


async def execute_ok(kc: Any, code: str, timeout: float = 20) -> str:
    """Run `code` in a kernel; its stdout (and traceback text), after asserting it ran ok."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a child process, zombie or fd of this process behind."""
    fds_before = open_fds()
    yield
    leaked_fds = open_fds() - fds_before
    children = child_processes()
    assert not children, f"leaked processes: {children}"
    assert not leaked_fds, f"leaked fds: {leaked_fds}"


def require_limit(spec: Any, controller: str) -> None:
    """Skip unless this user can enforce `spec`'s limit (CI delegates the controllers to its
    test user and sets NSPROV_REQUIRE_CGROUPS=1, which makes a missing one a failure)."""
    from nsprovisioner import SandboxError
    from nsprovisioner.cgroups import create_cgroup

    try:
        cgroup = create_cgroup(spec, "probe")
    except SandboxError as e:
        if os.environ.get("NSPROV_REQUIRE_CGROUPS") == "1":
            raise
        pytest.skip(f"no {controller} controller for this user: {e}")
    if cgroup is not None:
        cgroup.kill_and_remove()
