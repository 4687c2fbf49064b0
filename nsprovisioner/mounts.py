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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._nsexec import lib
from .devices import DeviceBind, plan_devices
from .egress import RESOLV_CONF
from .errors import SandboxError
from .interpreter import bind_interpreter
from .protect import protected_paths

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

# least to most restrictive. "protected" is read-only and, unlike "readonly",
# also wins over a writable path *below* it (protect.py says why). "pin"
# binds a directory onto itself, writable as before: a mount point can't be
# renamed, so an ancestor of a protected or hidden path can't be moved away
# with the protection and replaced by an unprotected copy.
KINDS = ("readwrite", "pin", "readonly", "protected", "hidden")
PATH_KEYS = {"readwrite": "readwrite_paths", "readonly": "readonly_paths",
             "hidden": "hidden_paths"}
RUN_TMPFS_SIZE = "16m"
TMPFS_INODES = 262144  # about 256 MiB of kernel memory at worst, per tmpfs
# host files that name a target under /run, which is private inside
RUN_TARGETS = ("/etc/resolv.conf",)


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
    source_dev: int = 0
    source_ino: int = 0


class PathPins:
    """What each configured path resolved to at a kernel's first start.

    A restart binds the same paths again: a path that now resolves elsewhere
    (a component renamed and recreated, a symlink swapped in by the kernel
    that just died) fails the start instead of binding what the kernel chose.
    """

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int, int]] = {}

    def check(self, given: str, real: str, st: os.stat_result) -> None:
        now = (real, st.st_dev, st.st_ino)
        first = self.seen.setdefault(given, now)
        if first == now:
            return
        what = (f"now resolves to {real}, not {first[0]}" if first[0] != real
                else "is now another directory or file than at the first start")
        raise SandboxError(
            f"{given} {what}: a component was renamed or replaced since this kernel first "
            "started, so the sandbox refuses to bind it",
            hint="shut the kernel down and start a new one if the change was yours")


def expand_path(value: str, key: str, cwd: str, pins: PathPins | None = None) -> str:
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
    if pins is not None:
        pins.check(text, path, os.stat(path))
    if path == "/":
        raise SandboxError(f"{key} entry {value!r} is the root; use readonly_root "
                           "to choose whether the root is writable")
    for tree in OWN_TREES:
        if path == tree or path.startswith(tree + "/"):
            raise SandboxError(f"{key} entry {value!r} ({path}) is inside {tree}, which the "
                               "sandbox mounts itself; remove it")
    return path


def resolve_paths(spec: SandboxSpec, cwd: str, pins: PathPins | None = None) -> dict[str, str]:
    """Real path -> kind, for every user path; the more restrictive kind wins a tie."""
    paths: dict[str, str] = {}
    for kind, key in PATH_KEYS.items():
        for value in getattr(spec, key):
            path = expand_path(value, key, cwd, pins)
            if KINDS.index(kind) >= KINDS.index(paths.get(path, "readwrite")):
                paths[path] = kind
    return paths


def state_root(spec: SandboxSpec) -> str | None:
    """The sandbox state directory (protect.py), made if missing, as a real path."""
    if spec.state_dir is None:
        return None
    path = os.path.expanduser(spec.state_dir)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return os.path.realpath(path)


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def add_protection(spec: SandboxSpec, paths: dict[str, str], argv0: str | None) -> set[str]:
    """Protected paths into `paths`, writable paths below them made read-only
    (but the state directory), and pins on the writable ancestors of every
    read-only or hidden path; the paths added."""
    before = dict(paths)
    state = state_root(spec)
    writable = [p for p, kind in paths.items() if kind == "readwrite"]
    for path in protected_paths(spec, writable, argv0):
        if KINDS.index(paths.get(path, "readwrite")) < KINDS.index("protected"):
            paths[path] = "protected"
    if state is not None:
        paths[state] = "readwrite"
    guarded = [p for p, kind in paths.items() if kind == "protected"]
    for path, kind in list(paths.items()):
        if kind == "readwrite" and path != state and any(
                _within(path, top) and path != top for top in guarded):
            paths[path] = "readonly"
    for path, kind in list(paths.items()):
        if kind in ("readonly", "protected", "hidden"):
            for ancestor in _writable_ancestors(spec, path, paths):
                paths.setdefault(ancestor, "pin")
    return {path for path, kind in paths.items() if before.get(path) != kind}


def _writable_ancestors(spec: SandboxSpec, path: str, paths: dict[str, str]) -> list[str]:
    """The directories between `path` and the mount it lies in, when that mount is
    writable (inside the sandbox's own tmpfs nothing needs pinning: its renames stay
    inside)."""
    between = []
    parent = os.path.dirname(path)
    while parent not in paths and parent != "/":
        between.append(parent)
        parent = os.path.dirname(parent)
    if parent == "/":
        own = (*OWN_TREES, *(("/tmp", "/var/tmp") if spec.private_tmp else ()),
               *(("/run",) if spec.private_run else ()))
        if spec.readonly_root or any(_within(path, t) for t in own):
            return []
        return between
    return between if paths[parent] in ("readwrite", "pin") else []


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

    def tmpfs(self, path: str, mode: int, size: str, optional: bool = False) -> None:
        """A fresh tmpfs at `path` inside, where deeper mount points are made 0755."""
        self.add(lib.NSX_MNT_MOUNT, NEWROOT + path, source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV, data=tmpfs_options(mode, size),
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

    def bind(self, path: str, source: str, attrs: int, identity: os.stat_result | None = None,
             flags: int = 0) -> None:
        self.ops.append(MountOp(lib.NSX_MNT_BIND, NEWROOT + path, source, mountflags=attrs,
                                flags=flags,
                                source_dev=identity.st_dev if identity else 0,
                                source_ino=identity.st_ino if identity else 0))
        self.binds.add(path)

    def user_path(self, path: str, kind: str, visible_below: bool, ours: bool = False,
                  source: str | None = None) -> None:
        """`ours`: protection or state the sandbox gets by default, which an identity that
        can't reach the path (e.g. uid 0 inside mapped to a subordinate uid, and home
        0700) neither needs nor can use. `source`: the host path bound there instead of
        `path` itself."""
        st = os.stat(source or path)
        is_dir = os.path.isdir(path)
        self.mount_point(path, is_dir)
        if kind != "hidden":
            self.bind(path, OLDROOT + (source or path),
                      MOUNT_ATTR_RDONLY if kind in ("readonly", "protected") else 0, st,
                      lib.NSX_MNT_REACHABLE if ours else 0)
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

    def dev(self, devices: list[DeviceBind]) -> None:
        """A /dev with only harmless nodes and the configured devices, bound from the
        host (mknod needs real root), then read-only."""
        self.ops += _fixed_ops(_Planner._dev)
        self.ours["/dev"] = (f"{NEWROOT}/dev", 0o755)
        for device in devices:
            self.mount_point(device.inside, False)
            self.bind(device.inside, OLDROOT + device.source,
                      MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, device.identity)
        self.add(lib.NSX_MNT_SETATTR, f"{NEWROOT}/dev", mountflags=MOUNT_ATTR_RDONLY)

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
        for source, name in DEV_LINKS:
            self.add(lib.NSX_MNT_SYMLINK, f"{NEWROOT}/dev/{name}", source=source)

    def dev_shm(self, size: str) -> None:
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/dev/shm", source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV, data=tmpfs_options(0o1777, size))

    def run(self) -> None:
        """A private /run: the host's sockets there (D-Bus, systemd, docker.sock,
        databases, the user's /run/user/UID) are out of reach even though
        connect() works through a read-only mount. Files that programs reach
        through a symlink into /run (resolv.conf) are bound back, read-only."""
        self.add(lib.NSX_MNT_MOUNT, f"{NEWROOT}/run", source="tmpfs", fstype="tmpfs",
                 mountflags=MS_NOSUID | MS_NODEV | MS_NOEXEC,
                 data=f"mode=0755,size={RUN_TMPFS_SIZE},nr_inodes=4096")
        self.ours["/run"] = (f"{NEWROOT}/run", 0o755)
        for link in RUN_TARGETS:
            target = os.path.realpath(link)
            if target.startswith("/run/") and os.path.isfile(target):
                self.mount_point(target, False)
                self.bind(target, OLDROOT + target, MOUNT_ATTR_RDONLY, os.stat(target))

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


def tmpfs_options(mode: int, size: str) -> str:
    """A tmpfs with a size and an inode cap: without them each is half the RAM, charged
    to no one when the sandbox has no memory limit."""
    return f"mode={mode:04o},size={size},nr_inodes={TMPFS_INODES}"


@functools.cache
def _fixed_ops(part: Callable[[_Planner], None]) -> tuple[MountOp, ...]:
    """The ops of a part of the table that depends on nothing: planned once per process
    (a MountOp costs more to make than to share; they are immutable)."""
    p = _Planner()
    part(p)
    return tuple(p.ops)


def plan_mounts(spec: SandboxSpec, cwd: str, *, argv0: str | None = None,
                pins: PathPins | None = None,
                sources: Mapping[str, str] | None = None) -> list[MountOp]:
    """The mount table of a sandbox; raises SandboxError for a bad path.

    `argv0` (the command's resolved path) adds its installation to what is
    protected; `pins` holds what each path resolved to at a kernel's first start.
    `sources`: read-only paths (real paths) that show another host directory of
    the same kind (a pooled kernel's runtime dir, pooled_kernel.py).
    """
    sources = dict(sources or {})
    user_paths = resolve_paths(spec, cwd, pins)
    added = add_protection(spec, user_paths, argv0)
    bind_interpreter(spec, argv0, user_paths)
    devices = plan_devices(spec, lambda path: _sandbox_can_write(spec, path, user_paths))
    p = _Planner()
    p.ops += _fixed_ops(_Planner._staging)
    if spec.readonly_root:
        p.add(lib.NSX_MNT_SETATTR, NEWROOT, mountflags=MOUNT_ATTR_RDONLY,
              flags=lib.NSX_MNT_RECURSIVE)

    # (depth, rank, path): the sandbox's own trees first at each depth, so a
    # user path (e.g. readwrite /tmp) can still override private_tmp.
    entries: list[tuple[int, int, str]] = [(1, 0, "/dev"), (1, 0, "/proc"), (1, 0, "/sys"),
                                           (2, 0, "/dev/shm")]
    if spec.private_tmp:
        entries += [(1, 0, "/tmp"), (2, 0, "/var/tmp")]
    if spec.private_run:
        entries += [(1, 0, "/run")]
    entries += [(_depth(path), 1, path) for path in user_paths]
    for _, rank, path in sorted(entries):
        if rank == 0:
            _plan_own(p, spec, path, devices)
            continue
        kind = user_paths[path]
        visible_below = kind == "hidden" and any(
            other.startswith(path + "/") and other_kind != "hidden"
            for other, other_kind in user_paths.items())
        if path in sources and kind != "readonly":
            raise SandboxError(f"{path} is both {kind} and the mount point of {sources[path]}")
        p.user_path(path, kind, visible_below, ours=path in added, source=sources.get(path))

    if spec.network == "egress":
        _plan_resolv_conf(p)
    p.add(lib.NSX_MNT_PIVOT, NEWROOT)
    return p.ops


def _plan_resolv_conf(p: _Planner) -> None:
    """network = "egress": names resolve through the stack's DNS forwarder, so the
    host's resolv.conf (or where its symlink leads) is covered by ours."""
    target = os.path.realpath("/etc/resolv.conf")
    if not os.path.isfile(target):
        return  # no file to cover, and /etc is read-only: no DNS inside
    p.mount_point(target, False)
    p.bind(target, OLDROOT + RESOLV_CONF, MOUNT_ATTR_RDONLY, os.stat(RESOLV_CONF))


def _sandbox_can_write(spec: SandboxSpec, path: str, paths: dict[str, str]) -> bool:
    """Whether the sandbox could change host `path` (the most specific rule wins)."""
    if _within(path, "/dev"):
        return False  # the sandbox's /dev is its own tmpfs: the host's is out of reach
    enclosing = [top for top in paths if _within(path, top)]
    if enclosing:
        return paths[max(enclosing, key=len)] in ("readwrite", "pin")
    own = (*(("/tmp", "/var/tmp") if spec.private_tmp else ()),
           *(("/run",) if spec.private_run else ()))
    return not spec.readonly_root and not any(_within(path, top) for top in own)


def _plan_own(p: _Planner, spec: SandboxSpec, path: str, devices: list[DeviceBind]) -> None:
    if path == "/dev":
        p.dev(devices)
    elif path == "/dev/shm":
        p.dev_shm(spec.tmpfs_size)
    elif path == "/run":
        p.run()
    elif path == "/proc":
        p.proc()
    elif path == "/sys":
        # read-only even with a writable root: sysfs files are the host kernel's
        p.add(lib.NSX_MNT_SETATTR, f"{NEWROOT}/sys", mountflags=MOUNT_ATTR_RDONLY,
              flags=lib.NSX_MNT_OPTIONAL | lib.NSX_MNT_RECURSIVE)
    else:  # /tmp, /var/tmp
        p.tmpfs(path, 0o1777, spec.tmpfs_size, optional=path == "/var/tmp")
