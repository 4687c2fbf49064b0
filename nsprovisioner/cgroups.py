"""A sandbox's cgroup made: its directories in each hierarchy, and its limits.

The layout and the names are cgroup_layout.py's; discovering the host's
hierarchies is cgroupfs.py's; the handle a running sandbox keeps is
sandbox_cgroup.py's. This module builds one sandbox's directories, writes
its limit files, and tells a user whose host can't enforce a limit why and
how to fix it.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cgroup_layout import (
    SERVER_LEAF,
    group_lock,
    group_name,
    parent_directory,
    sandbox_dir_name,
)
from .cgroupfs import (
    CgroupHost,
    Hierarchy,
    current_host,
    read_pids,
)
from .errors import SandboxError
from .sandbox_cgroup import CgroupDir, SandboxCgroup
from .slurm import job_id, slurm_fix

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

__all__ = ["SandboxCgroup", "create_cgroup"]

log = logging.getLogger(__name__)

# Read only for the memory and pids numbers in usage(); never a reason to fail.
ACCOUNTING = ("memory", "pids")


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
    if kind in ("writable", "delegate", "busy") and job_id() is not None:
        return slurm_fix(controller, path)  # the cgroups are Slurm's, not systemd's
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


def create_cgroup(spec: SandboxSpec, name: str | None, *,
                  host: CgroupHost | None = None) -> SandboxCgroup | None:
    """The cgroup of a new sandbox, with spec's limits written; None where none can be made.

    A limit that can't be enforced raises SandboxError when spec.strict, and
    is one warning otherwise. Without limits nothing here ever fails a start.
    """
    try:
        if host is None:
            # Which controllers the cgroup2 root offers decides where a limit
            # goes, and can change without a mount event (see _DetectCache): a
            # sandbox with limits looks afresh, at a cost that is small next
            # to its v1 cgroup.procs writes.
            host = CgroupHost.detect() if spec.has_limits or default_pids(spec) else current_host()
    except (OSError, ValueError) as e:  # an unreadable or unexpected /proc/self/mountinfo
        log.debug("cgroup hierarchies not found: %s", e)
        host = CgroupHost()
    builder = _Builder(host, spec, sandbox_dir_name(name))
    with group_lock:
        try:
            builder.build()
        except OSError as e:
            # cgroupfs failed where it shouldn't (a race with an admin, a
            # half-delegated tree): whatever is not in place yet is unenforced
            where = e.filename if isinstance(e.filename, str) else "cgroupfs"
            builder.unenforced(set(builder.limits), where, f"{where} failed unexpectedly",
                               fix_for("writable", "", where), e.errno or 0)
        except BaseException:
            builder.cgroup().kill_and_remove()
            raise
    cgroup = builder.cgroup()
    if default_pids(spec):
        builder.problems = [p for p in builder.problems if p.controller != "pids"]
    if builder.problems:
        report = "; ".join(p.describe() for p in builder.problems)
        if spec.strict:
            cgroup.kill_and_remove()
            raise SandboxError(f"resource limits can't be enforced: {report}",
                               hint="or set strict = false (--no-strict) to start without "
                               "the limits the host can't enforce")
        log.warning("starting the sandbox without some limits: %s", report)
    if not cgroup.dirs:
        cgroup.kill_and_remove()
        return None
    return cgroup


class _Builder:
    """Makes one sandbox's directories; collects the limits it could not enforce."""

    def __init__(self, host: CgroupHost, spec: SandboxSpec, name: str) -> None:
        self.host = host
        self.spec = spec
        self.name = name
        self.group = group_name()
        self.limits = limit_values(spec)
        self.problems: list[Unenforced] = []
        self.dirs: list[CgroupDir] = []
        self.group_dirs: list[str] = []
        self.clone_fd = -1

    def cgroup(self) -> SandboxCgroup:
        return SandboxCgroup(self.host, self.dirs, self.group_dirs, clone_fd=self.clone_fd,
                             strict=self.spec.strict)

    def unenforced(self, controllers: set[str] | frozenset[str], path: str, reason: str,
                   fix: str, err: int = 0) -> None:
        for c in sorted(controllers & self.limits.keys()):
            self.problems.append(Unenforced(c, path, reason, fix, err))

    def build(self) -> None:
        v2 = self.host.v2
        on_v2 = {c for c in self.limits if v2 is not None and c in v2.controllers}
        if v2 is not None:
            self.build_v2(v2, on_v2)
        for c in sorted(self.limits.keys() - on_v2):
            if self.host.v1_for(c) is None:
                where = f"cgroup2 at {v2.mount} lacks it and " if v2 else ""
                self.unenforced({c}, v2.mount if v2 else "/sys/fs/cgroup",
                                f"no mounted hierarchy has the {c} controller "
                                f"({where}no cgroup v1 hierarchy binds it)",
                                fix_for("absent", c, ""))
        if not self.limits:
            # Without limits a v1 cgroup buys only accounting: the pid
            # namespace already takes every process down with the init. And
            # each v1 cgroup.procs write may wait for an RCU grace period
            # (7-11 ms measured here), which every kernel start would pay.
            return
        for h in self.host.v1:
            limited = (self.limits.keys() - on_v2) & h.controllers
            useful = h.controllers & {"memory", "pids", "cpuacct"}
            if "freezer" in h.controllers and not any(d.version == 2 for d in self.dirs):
                useful = useful | {"freezer"}  # the only clean kill without cgroup v2
            if limited or useful:
                self.build_v1(h, limited)

    def parent(self, h: Hierarchy, controllers: set[str] | frozenset[str]) -> str | None:
        parent = parent_directory(h, self.spec.cgroup_parent)
        if parent is None:
            self.unenforced(controllers, h.mount,
                            f"the server's own cgroup is not visible in {h.mount} (mounted "
                            "from another cgroup namespace)", fix_for("parent", "", h.mount))
        return parent

    def make_group(self, h: Hierarchy, parent: str,
                   controllers: set[str] | frozenset[str]) -> str | None:
        """<parent>/<group>; None (and the problems noted) when it can't be made."""
        group = os.path.join(parent, self.group)
        try:
            if self.spec.cgroup_parent != "auto" and not self.host.exists(parent):
                self.make_parents(h, parent)
            # Usually absent (it goes with this server's last sandbox): one
            # mkdir, not a stat first
            try:
                self.host.make_dir(group)
            except FileExistsError:
                pass
        except OSError as e:
            self.cant_make(h, e, group, parent, controllers)
            return None
        self.group_dirs.append(group)
        return group

    def make_sandbox(self, h: Hierarchy, group: str,
                     controllers: set[str] | frozenset[str]) -> str | None:
        """<group>/<name>; None (and the problems noted) when it can't be made."""
        path = os.path.join(group, self.name)
        try:
            try:
                self.host.make_dir(path)
            except FileExistsError:  # a restart whose old cgroup is still going away
                path = f"{path}-{secrets.token_hex(3)}"
                self.host.make_dir(path)
        except OSError as e:
            self.cant_make(h, e, path, group, controllers)
            return None
        return path

    def cant_make(self, h: Hierarchy, e: OSError, path: str, parent: str,
                  controllers: set[str] | frozenset[str]) -> None:
        failed = e.filename if isinstance(e.filename, str) else path
        limited = sorted(controllers & self.limits.keys())
        self.unenforced(controllers, failed, f"the cgroup {failed} can't be created",
                        fix_for("writable", limited[0] if limited else "", parent),
                        e.errno or 0)
        log.debug("no %s cgroup for the sandbox: %s", h.label, e)

    def make_parents(self, h: Hierarchy, parent: str) -> None:
        """A configured cgroup_parent that does not exist yet: made, controllers enabled."""
        missing = []
        while not self.host.exists(parent) and parent != h.mount:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for path in reversed(missing):
            if h.version == 2:
                self.enable(parent, set(self.limits) & h.controllers)
            self.host.make_dir(path)
            parent = path

    def enable(self, parent: str, controllers: set[str]) -> set[str]:
        """Enable controllers for parent's children; those that failed (problems noted)."""
        if not controllers:
            return set()
        control = os.path.join(parent, "cgroup.subtree_control")
        try:
            enabled = set(self.host.read(control).split())
        except OSError as e:
            self.unenforced(controllers, parent, f"{control} can't be read",
                            fix_for("writable", "", parent), e.errno or 0)
            return controllers
        missing = controllers - enabled
        # The no-internal-processes rule, checked before any write: Linux
        # takes a threaded controller (cpu, pids) into a cgroup that holds
        # processes, and that makes it a thread root, in which memory then
        # fails with EOPNOTSUPP and below which no domain cgroup can be made.
        # So the server leaves first, and with other processes there nothing
        # is written.
        if missing and self.holds_processes(parent) and (
                not self.leave(parent) or self.holds_processes(parent)):
            for c in sorted(missing):
                self.enable_failed(parent, c, OSError(errno.EBUSY, os.strerror(errno.EBUSY)))
            return missing
        failed = set()
        for c in sorted(missing):
            try:
                self.host.write(control, f"+{c}")
            except OSError as e:
                failed.add(c)
                self.enable_failed(parent, c, e)
        return failed

    def holds_processes(self, cgroup: str) -> bool:
        """Whether the no-internal-processes rule keeps controllers from cgroup's children.

        Not for the root of the hierarchy (it has no cgroup.type), which
        Linux exempts; a cgroup namespace's root is a non-root cgroup too.
        """
        if not self.host.exists(os.path.join(cgroup, "cgroup.type")):
            return False
        return bool(read_pids(self.host, cgroup))

    def enable_failed(self, parent: str, c: str, e: OSError) -> None:
        if e.errno == errno.EBUSY:
            others = read_pids(self.host, parent)
            shown = " ".join(map(str, others[:5])) + (" ..." if len(others) > 5 else "")
            self.unenforced({c}, parent, f"{parent} holds processes ({shown}) and cgroup v2 "
                            "enables controllers only for the children of a cgroup without "
                            "processes (the no-internal-processes rule)",
                            fix_for("busy", c, parent))
        elif e.errno == errno.ENOENT:
            self.unenforced({c}, parent, f"the {c} controller is not delegated to {parent}",
                            fix_for("delegate", c, parent))
        else:
            self.unenforced({c}, parent, f"the {c} controller can't be enabled in "
                            f"{parent}/cgroup.subtree_control", fix_for("writable", c, parent),
                            e.errno or 0)

    def leave(self, parent: str) -> bool:
        """Move the server out of `parent` into its own leaf; whether it was there."""
        if os.getpid() not in read_pids(self.host, parent):
            return False
        group = os.path.join(parent, self.group)
        leaf = os.path.join(group, SERVER_LEAF)
        try:
            if not self.host.exists(group):
                self.host.make_dir(group)
            if not self.host.exists(leaf):
                self.host.make_dir(leaf)
            self.host.write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        except OSError as e:
            log.debug("can't move the server into %s: %s", leaf, e)
            return False
        log.info("moved the server into %s so that its sandboxes can have controllers "
                 "(cgroup v2 no-internal-processes rule)", leaf)
        return True

    def build_v2(self, h: Hierarchy, limited: set[str]) -> None:
        parent = self.parent(h, limited)
        if parent is None:
            return
        if self.spec.cgroup_parent != "auto" and not self.host.exists(parent):
            try:
                self.make_parents(h, parent)
            except OSError as e:
                self.unenforced(limited, parent, f"the cgroup {parent} can't be created",
                                fix_for("writable", "", parent), e.errno or 0)
                return
        try:
            offered = set(self.host.read(os.path.join(parent, "cgroup.controllers")).split())
        except OSError as e:
            self.unenforced(limited, parent, f"{parent} is not a cgroup",
                            fix_for("parent", "", h.mount), e.errno or 0)
            return
        for c in limited - offered:
            self.unenforced({c}, parent, f"the {c} controller is not delegated to {parent}",
                            fix_for("delegate", c, parent))
        wanted = limited & offered
        # Without a limit to enforce, don't touch what the parent enables
        # (that may move the server); a group's own children get what
        # accounting the parent already offers.
        enabled = wanted - self.enable(parent, wanted) if wanted else set()
        group = self.make_group(h, parent, enabled)
        if group is None:
            return
        # A child is offered at most what its parent is: when the parent offers
        # nothing to enable or count, the group's own list can't either.
        if enabled or offered & set(ACCOUNTING):
            offered = set(self.host.read(os.path.join(group, "cgroup.controllers")).split())
            enabled -= self.enable(group, enabled)
            self.enable_quietly(group, (set(ACCOUNTING) & offered) - enabled)
        path = self.make_sandbox(h, group, enabled)
        if path is None:
            return
        self.dirs.append(CgroupDir(path, h, frozenset(enabled)))
        self.problems += write_limits(self.host, path, 2, self.limits, enabled)
        try:
            self.clone_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.clone_fd = -1  # spawn falls back to cgroup.procs

    def enable_quietly(self, group: str, controllers: set[str]) -> None:
        control = os.path.join(group, "cgroup.subtree_control")
        for c in sorted(controllers):
            try:
                self.host.write(control, f"+{c}")
            except OSError as e:
                log.debug("no %s accounting in %s: %s", c, group, e)

    def build_v1(self, h: Hierarchy, limited: set[str]) -> None:
        parent = self.parent(h, limited)
        if parent is None:
            return
        group = self.make_group(h, parent, limited)
        path = self.make_sandbox(h, group, limited) if group is not None else None
        if path is None:
            return
        problems = write_limits(self.host, path, 1, self.limits, limited)
        self.problems += problems
        carried = limited - {p.controller for p in problems}
        self.dirs.append(CgroupDir(path, h, frozenset(carried)))
