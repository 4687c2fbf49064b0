"""The GrandChild's mount table, planned in Python and run by csrc/nsmount.c.

The layout follows bubblewrap: in the new (private) mount namespace a tmpfs
becomes a staging root, the host's root moves under it to /oldroot, and the
sandbox's root is assembled at /newroot from binds of /oldroot plus fresh
filesystems. A last pivot_root into /newroot detaches the staging area and
the host's root with it.

Every path is checked and resolved here, before the clone, so the C side
only runs the list. User paths are applied parents-first (by depth), so a
more specific path wins: a readable file inside a hidden directory stays
readable. For the same path listed twice, the more restrictive kind wins.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._nsexec import lib
from .errors import SandboxError

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
HIDDEN_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC

# Host paths during setup. The staging tmpfs covers /tmp only inside the new
# mount namespace; after the first pivot_root it is "/".
STAGE = "/tmp"
NEWROOT = "/newroot"
OLDROOT = "/oldroot"
HIDDEN_FILE = "/hidden-file"  # the empty, mode-000 file bound over hidden files

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"),
             ("/proc/self/fd/1", "stdout"), ("/proc/self/fd/2", "stderr"), ("pts/ptmx", "ptmx"))
# /proc entries that leak host information or control the host kernel
PROC_MASKED_FILES = ("kcore", "keys", "timer_list", "sched_debug", "latency_stats")
PROC_MASKED_DIRS = ("acpi", "scsi")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
# the sandbox mounts its own instances here; binding host paths in makes no sense
OWN_TREES = ("/proc", "/dev")

KINDS = ("readwrite", "readonly", "hidden")  # least to most restrictive
PATH_KEYS = {"readwrite": "readwrite_paths", "readonly": "readonly_paths",
             "hidden": "hidden_paths"}


@dataclass(frozen=True)
class MountOp:
    """One entry of struct nsx_mount."""

    op: int
    target: str
    source: str | None = None
    fstype: str | None = None
    mountflags: int = 0
    data: str | None = None
    flags: int = 0


def expand_path(value: str, key: str, cwd: str) -> str:
    """`value` with ~ and {cwd} expanded, checked and resolved to a real path."""
    text = value.replace("{cwd}", cwd)
    if text.startswith("~"):
        text = os.path.expanduser(text)
    if not os.path.isabs(text):
        raise SandboxError(f"{key} entry {value!r} ({text}) is not an absolute path; "
                           "use /..., ~ or {cwd}")
    if not os.path.exists(text):
        raise SandboxError(f"{key} entry {value!r} ({text}) does not exist; create it "
                           f"or remove it from {key}")
    # The binds must not follow symlinks inside the staging root, where an
    # absolute link would point elsewhere: use the real path on both sides.
    path = os.path.realpath(text)
    if path == "/":
        raise SandboxError(f"{key} entry {value!r} is the root; use readonly_root "
                           "to choose whether the root is writable")
    for tree in OWN_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise SandboxError(f"{key} entry {value!r} ({path}) is inside {tree}, which the "
                               "sandbox mounts itself; remove it")
    return path


def resolve_paths(spec: SandboxSpec, cwd: str) -> dict[str, str]:
    """Real path -> kind, for every user path; the more restrictive kind wins a tie."""
    paths: dict[str, str] = {}
    for kind in KINDS:
        key = PATH_KEYS[kind]
        for value in getattr(spec, key):
            paths[expand_path(value, key, cwd)] = kind
    return paths


def _depth(path: str) -> int:
    return path.rstrip("/").count("/")


class _Planner:
    def __init__(self) -> None:
        self.ops: list[MountOp] = []
        # inside path -> (where its mount points are made, their mode), for
        # the filesystems of our own that later mounts may need points in
        self.ours: dict[str, tuple[str, int]] = {}
        self.binds: set[str] = set()
        self.hidden_dirs = 0

    def add(self, op: int, target: str, *, source: str | None = None,
            fstype: str | None = None, mountflags: int = 0, data: str | None = None,
            flags: int = 0) -> None:
        self.ops.append(MountOp(op, target, source, fstype, mountflags, data, flags))

    def mkdir(self, path: str, mode: int) -> None:
        self.add(lib.NSX_MNT_MKDIR, path, mountflags=mode)
        if mode == 0:  # a mode of 0 in the table means the default
            self.add(lib.NSX_MNT_CHMOD, path, mountflags=0)

    def tmpfs(self, path: str, mode: int, optional: bool = False) -> None:
        """A fresh tmpfs at `path` inside, where deeper mount points are made 0755."""
        self.add(lib.NSX_MNT_MOUNT, NEWROOT + path, source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV, data=f"mode={mode:04o}",
                 flags=lib.NSX_MNT_OPTIONAL if optional else 0)
        self.ours[path] = (NEWROOT + path, 0o755)

    def mount_point(self, path: str, is_dir: bool) -> None:
        """Create the mount point when it lies in one of our filesystems (on the host it exists).

        Only the nearest enclosing mount counts: below a bind of the host the
        point exists already, and nothing of the host may be created.
        """
        enclosing = [p for p in (*self.ours, *self.binds) if path.startswith(p + "/")]
        if not enclosing:
            return
        nearest = max(enclosing, key=len)
        if nearest not in self.ours:
            return
        base, mode = self.ours[nearest]
        current = base
        rest = path[len(nearest) + 1:].split("/")
        for part in rest[:-1]:
            current += "/" + part
            self.mkdir(current, mode)
        if is_dir:
            self.mkdir(current + "/" + rest[-1], mode)
        else:
            self.add(lib.NSX_MNT_TOUCH, current + "/" + rest[-1])

    def bind(self, path: str, source: str, attrs: int) -> None:
        self.add(lib.NSX_MNT_BIND, NEWROOT + path, source=source, mountflags=attrs)
        self.binds.add(path)

    def user_path(self, path: str, kind: str, visible_below: bool) -> None:
        is_dir = os.path.isdir(path)
        self.mount_point(path, is_dir)
        if kind != "hidden":
            self.bind(path, OLDROOT + path, MOUNT_ATTR_RDONLY if kind == "readonly" else 0)
        elif not is_dir:
            self.bind(path, HIDDEN_FILE, MOUNT_ATTR_RDONLY)
        else:
            # An empty directory of the staging root, read-only from the start.
            # Traversable (never listable) only when a deeper path must stay
            # reachable; its mount points are made in the staging copy.
            self.hidden_dirs += 1
            stage = f"/hidden-dir-{self.hidden_dirs}"
            mode = 0o111 if visible_below else 0
            self.mkdir(stage, mode)
            self.bind(path, stage, HIDDEN_ATTRS)
            self.ours[path] = (stage, mode)

    def _staging(self) -> None:
        """The staging root, with the host's root at /oldroot and bound to /newroot."""
        # Nothing of ours may propagate to the host, nor the host's into a
        # half-built root.
        self.add(lib.NSX_MNT_MOUNT, "/", mountflags=MS_REC | MS_PRIVATE)
        self.add(lib.NSX_MNT_MOUNT, STAGE, source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV, data="mode=0755")
        self.add(lib.NSX_MNT_MKDIR, STAGE + NEWROOT)
        self.add(lib.NSX_MNT_MKDIR, STAGE + OLDROOT)
        self.add(lib.NSX_MNT_PIVOT, STAGE, source=OLDROOT.lstrip("/"))
        self.add(lib.NSX_MNT_TOUCH, HIDDEN_FILE)
        self.add(lib.NSX_MNT_CHMOD, HIDDEN_FILE, mountflags=0)
        self.add(lib.NSX_MNT_MOUNT, NEWROOT, source=OLDROOT, mountflags=MS_BIND | MS_REC)

    def dev(self) -> None:
        """A /dev with only harmless nodes, bound from the host (mknod needs real root)."""
        self.ops += _fixed_ops(_Planner._dev)

    def proc(self) -> None:
        """A /proc of the sandbox's pid namespace, with the host-revealing parts masked."""
        self.ops += _fixed_ops(_Planner._proc)

    def _dev(self) -> None:
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/dev", source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NOEXEC, data="mode=0755")
        for node in DEV_NODES:
            self.add(lib.NSX_MNT_TOUCH, f"{NEWROOT}/dev/{node}")
            self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/dev/{node}", source=f"{OLDROOT}/dev/{node}",
                     mountflags=MS_BIND)
        self.add(lib.NSX_MNT_MKDIR, f"{NEWROOT}/dev/pts")
        # newinstance: the sandbox's ptys are its own, not the host's
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/dev/pts", source="devpts", fstype="devpts",
                 mountflags=MS_NOSUID | MS_NOEXEC, data="newinstance,ptmxmode=0666,mode=620")
        self.add(lib.NSX_MNT_MKDIR, f"{NEWROOT}/dev/shm")
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/dev/shm", source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV, data="mode=1777")
        for source, name in DEV_LINKS:
            self.add(lib.NSX_MNT_SYMLINK, f"{NEWROOT}/dev/{name}", source=source)
        self.add(lib.NSX_MNT_SETATTR, f"{NEWROOT}/dev", mountflags=MOUNT_ATTR_RDONLY)

    def _proc(self) -> None:
        optional = lib.NSX_MNT_OPTIONAL
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/proc", source="proc", fstype="proc",
                 mountflags=MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in PROC_MASKED_FILES:
            self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/proc/{name}", source=f"{OLDROOT}/dev/null",
                     mountflags=MS_BIND, flags=optional)
        for name in PROC_MASKED_DIRS:
            self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/proc/{name}", source="tmpfs",
                     fstype="tmpfs", mountflags=MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                     data="mode=0555", flags=optional)
        for name in PROC_READONLY:
            target = f"{NEWROOT}/proc/{name}"
            self.add(lib.NSX_MNT_MOUNT, target, source=target, mountflags=MS_BIND | MS_REC,
                     flags=optional)
            self.add(lib.NSX_MNT_SETATTR, target, mountflags=MOUNT_ATTR_RDONLY,
                     flags=optional | lib.NSX_MNT_RECURSIVE)


@functools.cache
def _fixed_ops(part: Callable[[_Planner], None]) -> tuple[MountOp, ...]:
    """The ops of a part of the table that depends on nothing: planned once per process
    (a MountOp costs more to make than to share; they are immutable)."""
    p = _Planner()
    part(p)
    return tuple(p.ops)


def plan_mounts(spec: SandboxSpec, cwd: str) -> list[MountOp]:
    """The mount table of a sandbox; raises SandboxError for a bad path."""
    user_paths = resolve_paths(spec, cwd)
    p = _Planner()
    p.ops += _fixed_ops(_Planner._staging)
    if spec.readonly_root:
        p.add(lib.NSX_MNT_SETATTR, NEWROOT, mountflags=MOUNT_ATTR_RDONLY,
              flags=lib.NSX_MNT_RECURSIVE)

    # (depth, rank, path): the sandbox's own trees first at each depth, so a
    # user path (e.g. readwrite /tmp) can still override private_tmp.
    entries: list[tuple[int, int, str]] = [(1, 0, "/dev"), (1, 0, "/proc"), (1, 0, "/sys")]
    if spec.private_tmp:
        entries += [(1, 0, "/tmp"), (2, 0, "/var/tmp")]
    entries += [(_depth(path), 1, path) for path in user_paths]
    for _, rank, path in sorted(entries):
        if rank == 0:
            _plan_own(p, path)
            continue
        kind = user_paths[path]
        visible_below = kind == "hidden" and any(
            other.startswith(path + "/") and other_kind != "hidden"
            for other, other_kind in user_paths.items())
        p.user_path(path, kind, visible_below)

    p.add(lib.NSX_MNT_PIVOT, NEWROOT)
    return p.ops


def _plan_own(p: _Planner, path: str) -> None:
    if path == "/dev":
        p.dev()
    elif path == "/proc":
        p.proc()
    elif path == "/sys":
        # read-only even with a writable root: sysfs files are the host kernel's
        p.add(lib.NSX_MNT_SETATTR, f"{NEWROOT}/sys", mountflags=MOUNT_ATTR_RDONLY,
              flags=lib.NSX_MNT_OPTIONAL | lib.NSX_MNT_RECURSIVE)
    else:  # /tmp, /var/tmp
        p.tmpfs(path, 0o1777, optional=path == "/var/tmp")
