"""`jupyter nsprovisioner install` checks its options against the host (install_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsprovisioner import SandboxSpec
from nsprovisioner.doctor import CgroupFacts
from nsprovisioner.egress import PASTA_FIX
from nsprovisioner.install_check import problems_for

from .conftest import SLOWDOWN
from .test_cgroups import CANT_LIMIT
from .test_doctor import healthy_host

CLI = [sys.executable, "-m", "nsprovisioner.cli"]
UNDELEGATED = CgroupFacts(v2_mount="/sys/fs/cgroup", v2_controllers=["cpu", "memory", "pids"],
                          v2_own_dir="/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope",
                          v2_writable=False)


def test_a_limit_without_delegation_is_named_with_the_fix() -> None:
    facts = healthy_host(cgroup=UNDELEGATED)
    [problem] = problems_for(SandboxSpec(memory_limit="1G"), {"memory_limit": "1G"}, facts)
    assert problem.option == "memory_limit = 1G"
    assert "memory controller is not delegated to alice" in problem.detail
    assert "fail to start" in problem.detail
    assert "Delegate=yes" in problem.fix
    # non-strict kernels start, without the limit: still said
    [lax] = problems_for(SandboxSpec(memory_limit="1G", strict=False),
                         {"memory_limit": "1G", "strict": False}, facts)
    assert "start without the limit" in lax.detail


def test_what_the_options_dont_use_is_not_a_problem() -> None:
    facts = healthy_host(cgroup=UNDELEGATED, pasta=None)
    assert problems_for(SandboxSpec(), {}, facts) == []
    # a default pids limit never fails a start (cgroups.default_pids): not a problem either
    assert problems_for(SandboxSpec(nproc_limit=100), {"nproc_limit": 100}, facts) == []


def test_egress_without_pasta_is_named_with_the_fix() -> None:
    problems = problems_for(SandboxSpec(network="egress"), {"network": "egress"},
                            healthy_host(pasta=None))
    assert [p.option for p in problems] == ["network = 'egress'"]
    assert problems[0].fix == PASTA_FIX


def test_no_user_namespaces_is_a_problem_for_every_kernel() -> None:
    facts = healthy_host(userns_error="unshare(CLONE_NEWUSER): EPERM", failed_step="unshare_user")
    problems = problems_for(SandboxSpec(), {}, facts)
    assert [p.option for p in problems] == ["every kernel"]


def install(tmp_path: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "path" / "kernels" / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Source", "language": "python"}))
    env = {**os.environ, "JUPYTER_PATH": str(tmp_path / "path"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([*CLI, "install", "--from", "src", "--name", "limited",
                           "--prefix", str(tmp_path / "prefix"), *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120 * SLOWDOWN, check=False)


def test_strict_install_refuses_a_limit_this_user_cant_have(tmp_path: Path) -> None:
    """As root or a delegated user it installs; without delegation (the VM's undelegated
    pass) it refuses, names the option and the fix, and installs nothing."""
    result = install(tmp_path, "--strict", "--config", "memory_limit=1G")
    kernel_json = tmp_path / "prefix" / "share" / "jupyter" / "kernels" / "limited" / "kernel.json"
    undelegated = os.environ.get("NSPROV_EXPECT_UNDELEGATED") == "1"
    if os.environ.get("NSPROV_REQUIRE_CGROUPS") == "1" and CANT_LIMIT is not None:
        pytest.fail(f"this user can't limit memory here: {CANT_LIMIT}")
    if CANT_LIMIT is None and not undelegated:
        assert result.returncode == 0, result.stderr
        assert "memory_limit" not in result.stderr
        assert kernel_json.exists()
        return
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error: memory_limit = 1G: the memory controller is not delegated" in result.stderr
    assert "Delegate=yes" in result.stderr
    assert "kernelspec 'limited' not installed" in result.stderr
    assert not kernel_json.exists()


def test_install_warns_with_the_fix_and_installs(tmp_path: Path) -> None:
    # a PATH without pasta: network = "egress" can't work, as on a host without passt
    result = install(tmp_path, "--config", "network=egress",
                     path=os.path.dirname(sys.executable))
    assert result.returncode == 0, result.stderr
    assert "warning: network = 'egress': egress network: pasta not found" in result.stderr
    assert "fix: " + PASTA_FIX in result.stderr
    assert (tmp_path / "prefix" / "share" / "jupyter" / "kernels" / "limited").is_dir()
