"""cgroup_parent = "auto" inside a Slurm job, on fake cgroup v2 trees laid out as Slurm does.

The real cgroup v1 layout is tested end to end by tests/test_slurm.py; Slurm's
cgroup/v2 layout (system.slice/slurmstepd.scope/job_<id>/step_<s>/user/task_<t>)
is simulated here with tests/cgroupfs_fake.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nsprovisioner.cgroup_layout import group_name
from nsprovisioner.cgroups import create_cgroup
from nsprovisioner.errors import SandboxError
from nsprovisioner.sandbox import SandboxSpec
from nsprovisioner.slurm import job_cgroup, slurm_fix
from tests.cgroupfs_fake import FakeCgroupfs

TASK = "/system.slice/slurmstepd.scope/job_9/step_0/user/task_0"


@pytest.fixture
def in_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "9")


def test_kernel_cgroup_nests_in_the_jobs_when_it_is_delegated(tmp_path: Path,
                                                               in_job: None) -> None:
    fake = FakeCgroupfs(tmp_path, own=TASK, controllers="cpu memory pids",
                        delegated="cpu memory pids")
    fake.add_process(TASK, os.getpid())
    cgroup = create_cgroup(SandboxSpec(memory_limit="64M"), "k1", host=fake)
    assert cgroup is not None
    try:
        sandbox = Path(cgroup.paths[0])
        assert job_cgroup(str(sandbox)) == f"{tmp_path}/system.slice/slurmstepd.scope/job_9"
        assert sandbox == tmp_path / TASK.strip("/") / group_name() / "k1"
        assert (sandbox / "memory.max").read_text() == str(64 << 20)
    finally:
        cgroup.kill_and_remove()


def test_undelegated_job_cgroup_names_slurm_not_systemd(tmp_path: Path, in_job: None) -> None:
    fake = FakeCgroupfs(tmp_path, own=TASK, controllers="cpu memory pids", delegated="pids")
    fake.add_process(TASK, os.getpid())
    with pytest.raises(SandboxError) as e:
        create_cgroup(SandboxSpec(memory_limit="64M"), "k", host=fake)
    message = str(e.value)
    assert "Slurm job 9" in message and "job_9" in message
    assert "cgroup/v1" in message and "--mem" in message
    assert "Delegate=yes" not in message
    assert not (tmp_path / TASK.strip("/") / group_name() / "k").exists(), "no sandbox left"


def test_outside_a_job_the_fix_stays_systemds(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    fake = FakeCgroupfs(tmp_path, own=TASK, controllers="cpu memory pids", delegated="pids")
    fake.add_process(TASK, os.getpid())
    with pytest.raises(SandboxError) as e:
        create_cgroup(SandboxSpec(memory_limit="64M"), "k", host=fake)
    assert "Delegate=yes" in str(e.value) and "Slurm" not in str(e.value)


def test_v1_hierarchy_without_a_job_cgroup(in_job: None) -> None:
    fix = slurm_fix("pids", "/sys/fs/cgroup/pids")
    assert "no job cgroup in the hierarchy of pids" in fix and "nproc_limit" in fix
    assert "ConstrainRAMSpace=yes" in slurm_fix("memory", "/sys/fs/cgroup/memory")
