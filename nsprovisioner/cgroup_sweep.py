"""Sweeping the cgroups of servers that died (see cgroups.py for the layout).

A server's per-sandbox groups normally go with the sandboxes; a server killed
with sandboxes running leaves its group behind, and the next server of the
same user removes it at start.
"""

from __future__ import annotations

import logging
import os
import re

from .cgroupfs import CgroupHost, pid_namespace_id, process_start_time
from .cgroups import SERVER_LEAF, parent_directory
from .sandbox_cgroup import CgroupDir, SandboxCgroup

__all__ = ["sweep_stale_cgroups"]

log = logging.getLogger(__name__)

GROUP_RE = re.compile(r"nsprov-(\d+)-(\d+)-(\d+)-(\d+)")


def sweep_stale_cgroups(cgroup_parent: str = "auto", *,
                        host: CgroupHost | None = None) -> list[str]:
    """Kill and remove the groups of this user's servers that died; the paths removed.

    A group is stale when its server's pid is gone or now belongs to a
    process that started later. Groups from another pid namespace are left
    alone: their pids mean nothing here.
    """
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
            m = GROUP_RE.fullmatch(entry)
            if not m or int(m[1]) != uid or int(m[4]) != pidns:
                continue
            pid, started = int(m[2]), int(m[3])
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

