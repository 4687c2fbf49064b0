"""notebooks/tour.ipynb, run by its runner in the shipped python3-sandboxed kernel."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nsprovisioner.ipcdir import sockets_parent
from nsprovisioner.sandbox import DEFAULT_NPROC_LIMIT

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_tour_shows_the_sandbox_from_inside(tmp_path: Path) -> None:
    env = {**os.environ, "JUPYTER_PATH": str(ROOT / "share" / "jupyter"),
           "JUPYTER_TOKEN": "must-not-leak"}
    output = tmp_path / "tour.executed.ipynb"
    runner = subprocess.Popen([sys.executable, str(ROOT / "notebooks" / "run_tour.py"),
                               "--output", str(output)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = runner.communicate(timeout=100)
    assert runner.returncode == 0, stderr
    assert "PID 1: nsinit" in stdout
    # the runner shut its kernel down: a kernel left to die with it (PR_SET_PDEATHSIG)
    # leaves its init for the host's init to reap, and its socket dir for the next sweep
    assert not glob.glob(os.path.join(sockets_parent(), f"server-{runner.pid}-*"))
    nb = nbformat.read(output, as_version=4)
    assert all(cell.get("outputs", []) == [] or not any(o["output_type"] == "error"
                                                        for o in cell["outputs"])
               for cell in nb.cells if cell.cell_type == "code")
    summary = json.loads(nb.cells[-1].outputs[-1]["text"])
    assert summary["pid1"] == "nsinit" and summary["kernel_pid"] == 2
    assert summary["pid_namespace"] != os.readlink("/proc/self/ns/pid")
    assert os.getpid() not in summary["visible_pids"] and len(summary["visible_pids"]) < 10
    assert summary["uid"] == os.getuid()
    assert summary["uid_map"] == [str(os.getuid()), str(os.getuid()), "1"]
    assert summary["capabilities"] == "0000000000000000"
    assert summary["root_writable"] is False and summary["cwd_writable"] is True
    assert summary["secrets_seen"] == []
    assert summary["hostname"] == "sandbox"
    # the kernel's own cgroup at /sys/fs/cgroup: a root server's kernels get a pids limit
    # by default (cgroups.default_pids), which the tour reads from inside
    if os.geteuid() == 0 and os.environ.get("NSPROV_REQUIRE_CGROUPS") == "1":
        assert summary["limits"]["pids.max"] == str(DEFAULT_NPROC_LIMIT), summary["limits"]
        assert summary["limits"]["memory.max"] == "max"
