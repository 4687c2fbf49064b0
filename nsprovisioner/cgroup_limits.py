"""The limit files of cgroup v2 and v1, and what to tell a user whose host
can't enforce a limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cgroupfs import CgroupHost

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

LIMIT_KEYS = {"memory": "memory_limit", "pids": "pids_limit", "cpu": "cpu_limit"}
CPU_PERIOD_US = 100_000
CPU_MIN_QUOTA_US = 1_000  # the kernel refuses a quota below 1 ms


@dataclass(frozen=True)
class Unenforced:
    """A configured limit the host can't enforce, why, and how to make it able to."""

    controller: str
    path: str
    reason: str
    fix: str
    errno: int = 0

    def describe(self) -> str:
        why = f"{self.reason}: {os.strerror(self.errno)}" if self.errno else self.reason
        return f"{LIMIT_KEYS[self.controller]} needs the {self.controller} controller, " \
               f"but {why}. Fix: {self.fix}"


def default_pids(spec: SandboxSpec) -> bool:
    """Whether pids.max gets nproc_limit, no pids_limit being set. Linux exempts
    processes of the host's uid 0 from RLIMIT_NPROC, so a root server's kernels need
    the cgroup's count; elsewhere a cgroup made for other limits carries it too. A
    default never fails a start: where the host can't enforce it, it is skipped."""
    return spec.pids_limit is None and spec.nproc_limit is not None and (
        os.geteuid() == 0 or spec.memory_bytes is not None or spec.cpu_limit is not None)


def limit_values(spec: SandboxSpec) -> dict[str, float]:
    """controller -> the configured value, for the limits that are set."""
    values: dict[str, float] = {}
    if spec.memory_bytes is not None:
        values["memory"] = spec.memory_bytes
    if spec.pids_limit is not None:
        values["pids"] = spec.pids_limit
    elif spec.nproc_limit is not None and default_pids(spec):
        values["pids"] = spec.nproc_limit
    if spec.cpu_limit is not None:
        values["cpu"] = spec.cpu_limit
    return values


def limit_files(version: int, controller: str, value: float) -> list[tuple[str, str, bool]]:
    """(file, content, required) in the order they must be written."""
    if controller == "memory":
        size = str(int(value))
        if version == 2:
            # memory.swap.max counts swap alone; 0 keeps memory + swap at the
            # limit, as memsw does on v1.
            return [("memory.max", size, True), ("memory.swap.max", "0", False)]
        # memsw (memory + swap) may never be below the memory limit: set that first
        return [("memory.limit_in_bytes", size, True),
                ("memory.memsw.limit_in_bytes", size, False)]
    if controller == "pids":
        return [("pids.max", str(int(value)), True)]
    quota = str(max(CPU_MIN_QUOTA_US, round(value * CPU_PERIOD_US)))
    if version == 2:
        return [("cpu.max", f"{quota} {CPU_PERIOD_US}", True)]
    return [("cpu.cfs_period_us", str(CPU_PERIOD_US), True), ("cpu.cfs_quota_us", quota, True)]


def write_limits(host: CgroupHost, path: str, version: int, limits: dict[str, float],
                 controllers: set[str] | frozenset[str]) -> list[Unenforced]:
    """Write the limits of `controllers` into the cgroup at `path`; what failed."""
    failed = []
    for c in sorted(controllers & limits.keys()):
        for name, content, required in limit_files(version, c, limits[c]):
            file = os.path.join(path, name)
            if not required and not host.exists(file):
                continue  # e.g. no swap accounting: nothing can swap beyond the limit
            try:
                host.write(file, content)
            except OSError as e:
                failed.append(Unenforced(c, path, f"{file} can't be written",
                                         fix_for("writable", c, path), e.errno or 0))
                break
    return failed


def fix_for(kind: str, controller: str, path: str) -> str:
    """What a user does about an unenforceable limit of `kind`."""
    uid = os.geteuid()
    if kind == "absent":
        return (f"use a kernel with the {controller} controller (enabled in the cgroup2 "
                "root's cgroup.subtree_control, or mounted as a cgroup v1 hierarchy)")
    if kind == "parent":
        return (f"run the server where its own cgroup is visible under {path}, or set "
                "cgroup_parent to a cgroup path below that mount")
    if kind == "delegate":
        return (f"enable it for {path}: as root `echo +{controller} > "
                f"{os.path.dirname(path)}/cgroup.subtree_control` (and so on up to the root), "
                "or with systemd set `Delegate=yes` on the unit that runs the server "
                "(`systemctl edit user@.service` for user sessions)")
    if kind == "busy":
        return (f"move the other processes out of {path} into a leaf cgroup, or set "
                "cgroup_parent to a cgroup without processes (e.g. start the server with "
                "`systemd-run --user --scope -p Delegate=yes jupyter lab`)")
    return (f"delegate a cgroup to uid {uid}: run the server in a systemd unit with "
            "`Delegate=yes` (for user sessions: `systemctl edit user@.service`, add "
            "`[Service]` `Delegate=yes`; or `systemd-run --user --scope -p Delegate=yes "
            f"jupyter lab`), or as root `chown -R {uid} {path}`, or set cgroup_parent to a "
            "cgroup this user owns")
