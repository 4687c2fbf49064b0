"""The sandbox's /sys/fs/cgroup: its own cgroup, read-only.

Libraries size themselves from the cgroup they find (joblib/loky, the JVM,
Go, numba, psutil users) and a user checks the limits there. The host's
/sys/fs/cgroup, bound in with the rest of /sys, shows the host's tree: the
root's values ("max", 9223372036854771712) and every other cgroup's name.

The GrandChild unshares the cgroup namespace once it is in its final
cgroup, so a cgroupfs mounted after that (by the mount table) has the
sandbox's cgroup as its root: memory.max / memory.limit_in_bytes, pids.max
and cpu.max / cpu.cfs_quota_us there hold the configured limits. Each is
mounted read-only, where the host mounts it (cgroup2 on /sys/fs/cgroup, or
each v1 hierarchy on /sys/fs/cgroup/<name>), over an empty read-only tmpfs
that hides the rest. A process in the sandbox could otherwise raise its own
limits: the files of a cgroup a user created belong to that user.

Without a cgroup namespace or a cgroup of its own (no limit configured, no
cgroup could be made), a fresh cgroupfs would show another cgroup than the
sandbox's: /sys/fs/cgroup is only the empty tmpfs then.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._nsexec import lib
from .mounts import (
    MOUNT_ATTR_RDONLY,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    NEWROOT,
    MountOp,
)

if TYPE_CHECKING:
    from .sandbox import SandboxSpec
    from .sandbox_cgroup import SandboxCgroup

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUPFS_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC


def view_mounts(spec: SandboxSpec, cgroup: SandboxCgroup | None) -> list[MountOp]:
    """The mount ops that give the sandbox its /sys/fs/cgroup (none without one on the host)."""
    if not os.path.isdir(CGROUP_ROOT):
        return []
    own = cgroup is not None and "cgroup" in spec.namespaces
    dirs = cgroup.dirs if own and cgroup is not None else []
    # The tmpfs first, also where cgroup2 covers it: Linux refuses (EBUSY) to
    # mount a filesystem on a mount point where the same one is mounted already,
    # as the host's cgroup2 is on a pure v2 host.
    ops = [MountOp(lib.NSX_MNT_MOUNT, NEWROOT + CGROUP_ROOT, "tmpfs", "tmpfs",
                   MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64")]
    if any(d.version == 2 and d.hierarchy.mount == CGROUP_ROOT for d in dirs):
        # a pure cgroup-v2 host: the sandbox's cgroup2 is all there is
        return [*ops, MountOp(lib.NSX_MNT_MOUNT, NEWROOT + CGROUP_ROOT, "cgroup2", "cgroup2",
                              CGROUPFS_FLAGS)]
    names: dict[str, str] = {}  # inside name -> v1 controllers ("" for cgroup2)
    for d in dirs:
        h = d.hierarchy
        parent, base = os.path.split(h.mount)
        if parent != CGROUP_ROOT:
            base = "unified" if h.version == 2 else h.label
        names[base] = "" if h.version == 2 else ",".join(sorted(h.controllers))
    for base, controllers in names.items():
        target = f"{NEWROOT}{CGROUP_ROOT}/{base}"
        ops.append(MountOp(lib.NSX_MNT_MKDIR, target))
        ops.append(MountOp(lib.NSX_MNT_MOUNT, target, "cgroup2" if not controllers else "cgroup",
                           "cgroup2" if not controllers else "cgroup", CGROUPFS_FLAGS,
                           controllers or None))
    # co-mounted v1 controllers are reached by each name, as systemd links them
    for base, controllers in names.items():
        for c in controllers.split(",") if controllers else ():
            if c not in names:
                ops.append(MountOp(lib.NSX_MNT_SYMLINK, f"{NEWROOT}{CGROUP_ROOT}/{c}", base))
    ops.append(MountOp(lib.NSX_MNT_SETATTR, NEWROOT + CGROUP_ROOT, mountflags=MOUNT_ATTR_RDONLY))
    return ops


def with_cgroup_view(mounts: Sequence[MountOp], spec: SandboxSpec,
                     cgroup: SandboxCgroup | None) -> list[MountOp]:
    """`mounts` (plan_mounts()'s table) with the view added before its final pivot_root."""
    *table, pivot = mounts
    if pivot.op != lib.NSX_MNT_PIVOT:
        raise AssertionError("the mount table must end with its pivot_root")
    return [*table, *view_mounts(spec, cgroup), pivot]
