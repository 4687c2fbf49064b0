"""Where sandbox cgroups go and what they are called; sweeping those of dead servers.

Layout, in every hierarchy used (v2, and each v1 hierarchy that carries a
limit or accounting):

    <parent>/nsprov-<uid>-<pid>-<starttime>-<pidns>/   one per server process
        <name>/                                       one per sandbox (kernel id)
        nsprov-server/                                the server itself, only when
                                                      v2 made it leave <parent>

<parent> is cgroup_parent, or for "auto" the caller's own cgroup. The
server's identity is in the group's name because cgroupfs holds no files of
ours: the sweep can tell from the name alone whether the server that made a
group is dead (the start time guards against a reused pid, the pid
namespace against judging a pid it can't see).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import threading
from typing import TYPE_CHECKING, NamedTuple

from .cgroupfs import CgroupHost, Hierarchy, pid_namespace_id, process_start_time

if TYPE_CHECKING:
    from .sandbox_cgroup import CgroupDir

__all__ = ["group_name", "parent_directory", "sandbox_dir_name", "sweep_stale_cgroups"]

log = logging.getLogger(__name__)

GROUP_PREFIX = "nsprov-"
SERVER_LEAF = "nsprov-server"


def group_name(pid: int | None = None) -> str:
    """The name of the per-server group directory of `pid` (default: this process)."""
    own = os.getpid()
    pid = own if pid is None else pid
    if pid == own:
        return f"{GROUP_PREFIX}{os.geteuid()}-{pid}-{_own_identity(own)}"
    return f"{GROUP_PREFIX}{os.geteuid()}-{pid}-{process_start_time(pid)}-{pid_namespace_id()}"


@functools.cache
def _own_identity(pid: int) -> str:
    """The "<starttime>-<pidns>" of this process's group name; by pid, so a fork asks again.

    Neither changes while the process lives: setns and unshare(CLONE_NEWPID)
    move only the children into another pid namespace.
    """
    return f"{process_start_time(pid)}-{pid_namespace_id()}"


def sandbox_dir_name(name: str | None) -> str:
    """A directory name from the kernel id: letters, digits, '-' and '_' only."""
    if not name:
        return f"sandbox-{secrets.token_hex(6)}"
    clean = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:100]
    return clean if clean != SERVER_LEAF else f"{clean}_"


def parent_directory(h: Hierarchy, cgroup_parent: str) -> str | None:
    """Where the groups go in hierarchy `h`, or None when the caller's cgroup is unseen."""
    if cgroup_parent != "auto":
        return h.directory(cgroup_parent)
    if h.own_path is None:
        return None
    own = h.directory(h.own_path)
    if own is None:
        return None
    # An earlier sandbox moved the server into its own leaf, or this process
    # was started by a server there (a terminal, `nsprovisioner run` from a
    # notebook, a test's subprocess): the parent is still the cgroup the
    # server started in, which holds no process now. The leaf itself holds
    # the server: no controller could be enabled for a group below it.
    group = os.path.dirname(own)
    if os.path.basename(own) == SERVER_LEAF and os.path.basename(group).startswith(GROUP_PREFIX):
        return os.path.dirname(group)
    return own


class GroupOwner(NamedTuple):
    """Who made a group directory, read back from its name."""

    uid: int
    pid: int
    started: int
    pidns: int


GROUP_RE = re.compile(re.escape(GROUP_PREFIX) + r"(\d+)-(\d+)-(\d+)-(\d+)")


def parse_group_name(name: str) -> GroupOwner | None:
    """The owner of a group named by group_name(), or None for any other name."""
    m = GROUP_RE.fullmatch(name)
    return GroupOwner(*(int(g) for g in m.groups())) if m else None


# Held while group directories are made or removed, so that one sandbox's
# removal can't rmdir the group another thread is creating a sandbox in.
group_lock = threading.Lock()


def sweep_stale_cgroups(cgroup_parent: str = "auto", *,
                        host: CgroupHost | None = None) -> list[str]:
    """Kill and remove the groups of this user's servers that died; the paths removed.

    A group is stale when its server's pid is gone or now belongs to a
    process that started later. Groups from another pid namespace are left
    alone: their pids mean nothing here.
    """
    # (the per-sandbox handle needs this module's lock: imported here, not at the top)
    from .sandbox_cgroup import CgroupDir, SandboxCgroup

    host = CgroupHost.detect() if host is None else host
    uid, pidns = os.geteuid(), pid_namespace_id()
    stale: dict[tuple[str, str], list[CgroupDir]] = {}
    groups: list[str] = []
    leaves: list[str] = []
    hierarchies = ([host.v2] if host.v2 else []) + host.v1
    for h in hierarchies:
        parent = parent_directory(h, cgroup_parent)
        if parent is None:
            continue
        for entry in host.list_dirs(parent):
            owner = parse_group_name(entry)
            if owner is None or owner.uid != uid or owner.pidns != pidns:
                continue
            pid, started = owner.pid, owner.started
            if process_start_time(pid) == started:
                continue  # its server is alive
            group = os.path.join(parent, entry)
            groups.append(group)
            for child in host.list_dirs(group):
                if child == SERVER_LEAF:
                    leaves.append(os.path.join(group, child))
                else:
                    stale.setdefault((entry, child), []).append(
                        CgroupDir(os.path.join(group, child), h))
    removed = []
    for dirs in stale.values():
        # v2 first: one cgroup.kill there empties the v1 directories too
        dirs.sort(key=lambda d: -d.version)
        SandboxCgroup(host, dirs, [], strict=False).kill_and_remove()
        removed += [d.path for d in dirs if not host.exists(d.path)]
    # The server's leaf may hold what the dead server started outside its
    # sandboxes (terminals): not ours to kill; removed only once empty.
    for path in leaves + groups:
        try:
            host.remove_dir(path)
            removed.append(path)
        except OSError as e:
            log.info("stale cgroup %s left in place: %s", path, os.strerror(e.errno or 0))
    if removed:
        log.info("removed cgroups of servers that died: %s", " ".join(removed))
    return removed

