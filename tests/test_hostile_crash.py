"""Nothing of a sandbox is left after its server dies (issue 11, attack 11).

A server killed with SIGKILL (the OOM killer, a crash) can't clean up: the
kernels' connection files (their keys) and ipc socket dirs stay, and so do
the cgroups of `nsprovisioner run`. The next server, or the next run, must
remove what dead ones left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsprovisioner.cgroup_layout import group_name
from nsprovisioner.sandbox_cgroup import CgroupDir, SandboxCgroup

from .hostile import SANDBOXED, ServerProcess, make_host
from .test_cgroups import HOST, groups_named
from .test_provisioner import cmdlines

pytestmark = pytest.mark.timeout(60)


def wait_gone(marker: str, timeout: float = 10) -> None:
    """Wait until no process's command line holds `marker` (PR_SET_PDEATHSIG takes a moment)."""
    deadline = time.monotonic() + timeout
    while any(marker in c for c in cmdlines()):
        assert time.monotonic() < deadline, f"a process with {marker} outlived its server"
        time.sleep(0.05)


@pytest.mark.parametrize("kernelspec", [SANDBOXED, "nonet"], ids=["host", "none"])
def test_next_server_removes_a_killed_servers_kernel_files(tmp_path: Path,
                                                           kernelspec: str) -> None:
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "killed.log") as killed:
        started = killed.ok("start", name=kernelspec, cwd=str(host.home / "notebooks"))
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
    connection_file = Path(started["connection_file"])
    info = started["connection_info"]
    socket_dir = Path(info["ip"]).parent if info["transport"] == "ipc" else None
    try:
        wait_gone(str(connection_file))
        left = [p for p in (connection_file, socket_dir) if p is not None and p.exists()]
        assert left, "nothing was left to clean up: the test shows nothing"
        with ServerProcess(host, tmp_path / "next.log") as server:
            server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))
            still = [str(p) for p in left if p.exists()]
        assert not still, f"a new server left the killed server's kernel files: {still}"
    finally:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)


RUN = [sys.executable, "-m", "nsprovisioner.cli", "run", "--memory-limit", "64M", "--"]


@pytest.mark.usefixtures("memory_controller")
def test_next_run_removes_a_killed_runs_cgroups(tmp_path: Path) -> None:
    killed = subprocess.Popen([*RUN, "sh", "-c", "echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    groups = []
    try:
        assert killed.stdout is not None and killed.stdout.readline() == "ready\n"
        groups = groups_named(group_name(killed.pid))
        assert groups, "the run has no cgroup to leave behind"
        killed.kill()
        killed.wait()
        wait_gone("exec sleep 60")
        subprocess.run([*RUN, "true"], check=True, timeout=30, cwd=tmp_path)
        left = [g for _, g in groups if os.path.exists(g)]
        assert not left, f"the next run left the killed run's cgroups: {left}"
    finally:
        killed.kill()
        killed.wait()
        for hierarchy, group in groups:  # what the next run should have removed
            if os.path.isdir(group):
                dirs = [CgroupDir(e.path, hierarchy) for e in os.scandir(group) if e.is_dir()]
                SandboxCgroup(HOST, dirs, [group]).kill_and_remove()


from .test_kernel_limits import memory_controller  # noqa: F401 - the fixture above
