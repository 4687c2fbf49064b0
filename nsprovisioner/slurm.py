"""A server inside a Slurm job: the job's cgroups, and what its admin sets for kernels' to nest there.

With cgroup_parent = "auto" kernel cgroups go below the server's own cgroup,
which inside a job is the job's (Slurm's task/cgroup put it there): the
kernels' limits then nest inside the job's, and the job's limit still holds
over all of them. Whether that works is Slurm's configuration, so a failure
names the slurm.conf/cgroup.conf setting instead of systemd's Delegate=yes.

Slurm's layouts (22.05, the tested one, and later):
  cgroup/v1: /sys/fs/cgroup/<controller>/slurm[_<node>]/uid_<uid>/job_<id>/step_<s>[/task_<t>]
             in memory (task/cgroup, ConstrainRAMSpace), freezer (proctrack/cgroup),
             cpuset and devices; the step's directories belong to the job's user.
  cgroup/v2: /sys/fs/cgroup/system.slice/slurmstepd.scope/job_<id>/step_<s>/user/task_<t>
"""

from __future__ import annotations

import os
import re

__all__ = ["job_cgroup", "job_id", "slurm_fix"]

JOB_RE = re.compile(r"/job_(\d+)(?=/|$)")
LIMIT_KEYS = {"memory": "memory_limit", "pids": "pids_limit", "cpu": "cpu_limit"}
# what sbatch asks for instead, when the job's own limit has to do
JOB_OPTION = {"memory": "--mem with ConstrainRAMSpace=yes", "cpu": "--cpus-per-task with "
              "ConstrainCores=yes", "pids": "nproc_limit, which needs no cgroup"}


def job_id() -> str | None:
    """The Slurm job this process runs in, or None (SLURM_JOB_ID, set by slurmstepd)."""
    value = os.environ.get("SLURM_JOB_ID", "")
    return value if value.isdigit() else None


def job_cgroup(path: str | None) -> str | None:
    """The job's own directory in a cgroup path or directory, or None when it is in no job's."""
    if not path:
        return None
    m = JOB_RE.search(path)
    return path[:m.end()] if m else None


def slurm_fix(controller: str, path: str, job: str | None = None) -> str:
    """What the admin of `job` (default: job_id()) sets so that a kernel limit of
    `controller` nests at `path`.

    `path` is the cgroup that could not be used: the server's own (or a
    directory below it). Inside the job's cgroup, only the step's ownership is
    missing; outside it, Slurm made no job cgroup in that hierarchy.
    """
    job = job or job_id()
    key = LIMIT_KEYS.get(controller, "a limit")
    instead = JOB_OPTION.get(controller, "the job's own limits")
    if job_cgroup(path) is not None:
        return (f"this runs in Slurm job {job}, whose cgroup {path} is not writable by uid "
                f"{os.geteuid()}: Slurm's cgroup/v1 plugin gives the job's step cgroups to its "
                "user (tested with Slurm 22.05: CgroupPlugin=cgroup/v1, TaskPlugin=task/cgroup, "
                "ProctrackType=proctrack/cgroup), its cgroup/v2 plugin does not; otherwise "
                f"leave {key} unset and rely on the job's own limit ({instead})")
    if controller == "memory":
        return (f"this runs in Slurm job {job}, which has no memory cgroup of its own: set "
                "TaskPlugin=task/cgroup in slurm.conf and ConstrainRAMSpace=yes in cgroup.conf; "
                "the job's limit (--mem) then holds over all its kernels, each kernel's nested "
                "inside it")
    return (f"this runs in Slurm job {job}, and Slurm makes no job cgroup in the hierarchy of "
            f"{controller or 'this controller'} ({path} is outside the job): {key} can't nest "
            f"in the job; leave it unset and rely on {instead} (with cgroup v1 Slurm uses only "
            "memory, freezer, cpuset, devices and cpuacct)")
