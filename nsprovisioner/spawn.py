"""spawn(): start a command in a new sandbox and hand back its init.

This is the Parent of the seed's diagram. It validates and builds every
buffer the C stages need, clones the Child through csrc/nsexec.c, drives the
handshake (handshake.py), and on any failure kills and reaps what it started
and closes every fd it opened before raising one SandboxError.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import IO, Any

from ._nsexec import ffi, lib
from .cgroups import SandboxCgroup, create_cgroup
from .errors import STEP_VALUES, SandboxError
from .handshake import Handshake, SyncChannel, give_back_stack, run_handshake, take_stack
from .idmap import IdRange, check_helper_map, needs_helper, write_id_maps
from .initexe import init_memfd, init_path
from .mounts import MountOp, PathPins, plan_mounts
from .process import SandboxProcess
from .protect import SANDBOX_SITE, sandbox_state_env, state_paths
from .sandbox import SandboxSpec, check_argv, check_env
from .seccomp import build_filter

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
Stdio = int | IO[Any] | None

CLONE_FLAGS = {"mount": 0x00020000, "uts": 0x04000000, "ipc": 0x08000000,
               "pid": 0x20000000, "net": 0x40000000}


def resolve_command(name: str, env: Mapping[str, str]) -> str:
    """argv[0] as a path: exec in the GrandChild can't search PATH (no malloc)."""
    if "/" in name:
        return name
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name  # exec fails with ENOENT and reports it


def check_cwd(cwd: str | os.PathLike[str] | None) -> str:
    path = os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd()
    if "\0" in path:
        raise SandboxError(f"cwd {path!r} contains a NUL byte")
    if not os.path.isdir(path):
        raise SandboxError(f"cwd {path} does not exist or is not a directory", step="chdir")
    return path


USER_COUNTERS_DIR = "/proc/sys/user"


def user_counters(spec: SandboxSpec) -> list[tuple[str, str]]:
    """(file, value) for the /proc/sys/user counters this host has, lowered only: a
    value above the host's own per-user limit would mean nothing."""
    out = []
    for name, value in spec.user_counters.items():
        path = os.path.join(USER_COUNTERS_DIR, name)
        try:
            with open(path, "rb") as f:
                host = int(f.read())
        except (OSError, ValueError):
            continue  # a counter this kernel doesn't have
        out.append((path, str(min(value, host))))
    return out


def rlimits(spec: SandboxSpec) -> list[tuple[int, int]]:
    """(resource, limit): RLIMIT_NPROC counts the processes of the sandbox's user in its
    own user namespace (Linux 5.14+), so it caps this sandbox, not the user's others."""
    if spec.nproc_limit is None:
        return []
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]  # only root could raise it
    limit = spec.nproc_limit if hard == resource.RLIM_INFINITY else min(spec.nproc_limit, hard)
    return [(resource.RLIMIT_NPROC, limit)]


def outside_id(ranges: Sequence[IdRange], inside: int) -> int | None:
    for r in ranges:
        if r.inside <= inside < r.inside + r.count:
            return r.outside + inside - r.inside
    return None


def share_memory(spec: SandboxSpec) -> bool:
    """Whether the stages may run in our memory instead of a copy (docs/design.md).

    The kernel ties the dumpable flag to the memory, and resets it when a
    process of it changes its effective ids: a GrandChild taking an identity
    whose ids outside are not ours would make this server non-dumpable (and
    an unprivileged one could then no longer write the next sandbox's maps).
    A non-dumpable unprivileged server can't write a sharing Child's maps at
    all. Both cases take the copy, where the Child's dumpable flag is its own.
    """
    if not lib.nsx_can_share_memory():
        return False
    euid, egid = os.geteuid(), os.getegid()
    if (outside_id(spec.uid_ranges, spec.uid) != euid
            or outside_id(spec.gid_ranges, spec.gid) != egid):
        return False
    return euid == 0 or lib.nsx_dumpable() == 1


class _Stdio:
    """The fds the command gets as 0, 1, 2 (and pass_fds), and what to close after."""

    def __init__(self, stack: ExitStack) -> None:
        self.pairs: list[tuple[int, int]] = []
        self.parent_ends: list[IO[bytes] | None] = [None, None, None]
        self.child_ends: list[int] = []
        # the child's ends go in any case; ours only when the spawn fails
        stack.callback(self.close_child_ends)
        stack.push(lambda failed, *_: self.close_parent_ends() if failed else None)

    def add(self, dst: int, spec: Stdio) -> None:
        if spec is None:
            try:
                os.fstat(dst)
                self.pairs.append((dst, dst))
                return
            except OSError:
                spec = DEVNULL
        if spec == DEVNULL:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.child_ends.append(fd)
            self.pairs.append((fd, dst))
        elif spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            mine, theirs = (w, r) if dst == 0 else (r, w)
            self.child_ends.append(theirs)
            self.parent_ends[dst] = os.fdopen(mine, "wb" if dst == 0 else "rb", buffering=0)
            self.pairs.append((theirs, dst))
        elif isinstance(spec, int):
            if spec < 0:
                raise SandboxError(f"fd {spec} for stdio {dst} is invalid")
            self.pairs.append((spec, dst))
        else:
            self.pairs.append((spec.fileno(), dst))

    def close_child_ends(self) -> None:
        for fd in self.child_ends:
            os.close(fd)
        self.child_ends = []

    def close_parent_ends(self) -> None:
        for end in self.parent_ends:
            if end is not None:
                end.close()
        self.parent_ends = [None, None, None]


class _CConfig:
    """struct nsx_config and every buffer it points to.

    The stages read these buffers in place (they share our memory), so the
    object lives until both stages are reaped or have exec'd.
    """

    def __init__(self) -> None:
        self._keep: list[Any] = []
        self.cfg = ffi.new("struct nsx_config *")

    def string(self, text: str | None) -> Any:
        if text is None:
            return ffi.NULL
        buf = ffi.new("char[]", text.encode())
        self._keep.append(buf)
        return buf

    def buffer(self, data: bytes) -> Any:
        buf = ffi.from_buffer(data)
        self._keep.append(buf)
        return buf

    def keep(self, obj: Any) -> Any:
        self._keep.append(obj)
        return obj

    def string_array(self, items: Sequence[str]) -> Any:
        """A NULL-terminated char *[] over one buffer holding every string."""
        encoded = [s.encode() for s in items]
        data = self.keep(ffi.new("char[]", b"\0".join(encoded) + b"\0"))
        arr = self.keep(ffi.new("char *[]", len(encoded) + 1))
        offset = 0
        for i, item in enumerate(encoded):
            arr[i] = data + offset
            offset += len(item) + 1
        return arr


class _MountTables:
    """struct nsx_mount[] per mount plan, built once: a server starts its
    kernels with the same few plans, and building the array was a good part
    of the Python work per start. An entry is never changed once built, and
    a spawn keeps the entry it uses alive (through its _CConfig) even if it
    is evicted meanwhile."""

    LIMIT = 32

    def __init__(self) -> None:
        self._tables: dict[tuple[MountOp, ...], _MountTable] = {}
        self._lock = threading.Lock()  # servers may spawn from several threads' loops

    def get(self, plan: Sequence[MountOp]) -> _MountTable:
        key = tuple(plan)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                table = _MountTable(key)
                if len(self._tables) >= self.LIMIT:
                    del self._tables[next(iter(self._tables))]
                self._tables[key] = table
            return table


class _MountTable:
    """One plan as struct nsx_mount[], with the strings it points to."""

    def __init__(self, plan: tuple[MountOp, ...]) -> None:
        self._strings: dict[str, Any] = {}
        self.count = len(plan)
        self.array = ffi.new("struct nsx_mount[]", max(len(plan), 1))
        for i, m in enumerate(plan):
            self.array[i] = {"op": m.op, "flags": m.flags, "source": self._string(m.source),
                             "target": self._string(m.target), "fstype": self._string(m.fstype),
                             "mountflags": m.mountflags, "data": self._string(m.data),
                             "source_dev": m.source_dev, "source_ino": m.source_ino}

    def _string(self, text: str | None) -> Any:
        if text is None:
            return ffi.NULL
        if text not in self._strings:
            self._strings[text] = ffi.new("char[]", text.encode())
        return self._strings[text]


_mount_tables = _MountTables()


async def spawn(
    spec: SandboxSpec,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: Stdio = None,
    stdout: Stdio = None,
    stderr: Stdio = None,
    pass_fds: Sequence[int] = (),
    name: str | None = None,
    path_pins: PathPins | None = None,
    _fault_step: str | None = None,
) -> SandboxProcess:
    """Start `argv` in a new sandbox described by `spec`; returns once it is exec'd.

    stdin/stdout/stderr: None (inherit), DEVNULL, PIPE, an fd or a file.
    `name` names the sandbox's cgroup (e.g. the kernel id); a random one by default.
    `path_pins`: what the configured paths resolved to at the first of a
    series of starts (a kernel and its restarts); a path that resolves
    elsewhere now fails the start.
    `_fault_step` (tests only) makes the named step fail.
    """
    if not isinstance(spec, SandboxSpec):
        raise SandboxError(f"spec must be a SandboxSpec, not {type(spec).__name__}")
    args = check_argv(argv)
    environ = dict(os.environ if env is None else env)
    # Home's dot entries are read-only inside (protect.py): tools write their
    # caches and state into the sandbox's state dir instead, unless the
    # caller (the provisioner, for one kernelspec) already said where.
    for key, value in sandbox_state_env(state_paths(spec, "default"), environ).items():
        if key not in environ or (key == "PYTHONPATH" and SANDBOX_SITE not in
                                  environ[key].split(os.pathsep)):
            environ[key] = value
    envp = check_env(environ)
    workdir = check_cwd(cwd)
    fault = 0
    if _fault_step is not None:
        if _fault_step not in STEP_VALUES:
            raise SandboxError(f"unknown fault step {_fault_step!r}")
        fault = STEP_VALUES[_fault_step]
    deny_setgroups = os.geteuid() != 0 and not needs_helper(list(spec.gid_ranges), os.getegid())
    for ranges, kind, own in ((spec.uid_ranges, "uid_map", os.geteuid()),
                              (spec.gid_ranges, "gid_map", os.getegid())):
        if needs_helper(list(ranges), own):
            check_helper_map(list(ranges), kind, own)

    command = resolve_command(args[0], environ)
    mounts = plan_mounts(spec, workdir, argv0=command, pins=path_pins)
    seccomp_filter = build_filter(spec.seccomp, spec.strict)
    cgroup = create_cgroup(spec, name)
    try:
        return await _clone_and_handshake(spec, args, envp, command, workdir, mounts,
                                          seccomp_filter, cgroup, fault, deny_setgroups,
                                          (stdin, stdout, stderr), pass_fds)
    except BaseException:
        if cgroup is not None:
            cgroup.kill_and_remove()
        raise


async def _clone_and_handshake(
    spec: SandboxSpec, args: list[str], envp: list[str], command: str,
    workdir: str, mounts: Sequence[MountOp], seccomp_filter: bytes | None,
    cgroup: SandboxCgroup | None, fault: int, deny_setgroups: bool,
    stdio_specs: tuple[Stdio, Stdio, Stdio], pass_fds: Sequence[int],
) -> SandboxProcess:
    with ExitStack() as stack:
        stdio = _Stdio(stack)
        for dst, s in enumerate(stdio_specs):
            stdio.add(dst, s)
        for fd in pass_fds:
            stdio.pairs.append((fd, fd))
        sync_target = max(3, max(dst for _, dst in stdio.pairs) + 1)

        if spec.init:
            exec_path = init_path()
            exec_fd = init_memfd()
            exec_argv = ["nsinit", "--sync-fd", str(sync_target), "--", *args]
        else:
            exec_path = command
            exec_fd = -1
            exec_argv = args

        child_parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc_parent, gc_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stack.callback(child_end.close)
        stack.callback(gc_end.close)
        child = SyncChannel(child_parent, "child")
        grandchild = SyncChannel(gc_parent, "grandchild")
        stack.callback(child.close)
        stack.callback(grandchild.close)

        c = _CConfig()
        cfg = c.cfg
        cfg.child_sync_fd = child_end.fileno()
        cfg.grandchild_sync_fd = gc_end.fileno()
        cfg.parent_sync_fds = [child_parent.fileno(), gc_parent.fileno()]
        cfg.unshare_flags = sum(CLONE_FLAGS[n] for n in spec.namespaces if n in CLONE_FLAGS)
        cfg.unshare_cgroup = int("cgroup" in spec.namespaces)
        cfg.loopback_up = int("net" in spec.namespaces)
        cfg.cgroup_fd = cgroup.clone_fd if cgroup is not None else -1
        cfg.uid = spec.uid
        cfg.gid = spec.gid
        cfg.drop_groups = int(not deny_setgroups)
        cfg.hostname = c.string(spec.hostname if "uts" in spec.namespaces else None)
        table = c.keep(_mount_tables.get(mounts))
        cfg.mounts = table.array
        cfg.n_mounts = table.count
        cfg.cwd = c.string(workdir)
        cfg.fds = c.keep(ffi.new("struct nsx_fdmap[]", [{"src": s, "dst": d}
                                                        for s, d in stdio.pairs]))
        cfg.n_fds = len(stdio.pairs)
        cfg.sync_target_fd = sync_target
        cfg.sync_keep_on_exec = int(spec.init)
        cfg.exec_fd = exec_fd
        cfg.exec_path = c.string(exec_path)
        cfg.argv = c.string_array(exec_argv)
        cfg.envp = c.string_array(envp)
        counters = user_counters(spec)
        cfg.user_counters = c.keep(ffi.new("struct nsx_counter[]", [
            {"path": c.string(path), "value": c.string(value)} for path, value in counters]))
        cfg.n_user_counters = len(counters)
        limits = rlimits(spec)
        cfg.rlimits = c.keep(ffi.new("struct nsx_rlimit[]", [
            {"resource": r, "soft": v, "hard": v} for r, v in limits]))
        cfg.n_rlimits = len(limits)
        cfg.no_new_privs = 1
        cfg.drop_caps = 1
        if seccomp_filter:
            cfg.seccomp_filter = c.buffer(seccomp_filter)
            cfg.seccomp_len = len(seccomp_filter) // 8  # struct sock_filter
        else:
            cfg.seccomp_filter = ffi.NULL
        cfg.fault_step = fault

        cfg.grandchild_tid = grandchild_tid = ffi.new("int *")
        pidfd = ffi.new("int *")
        into_cgroup = ffi.new("int *")
        cfg.share_memory = share = share_memory(spec)
        stack = ffi.new("void **", take_stack() if share else ffi.NULL)
        if fault == STEP_VALUES["clone_child"]:
            give_back_stack(stack[0])
            pid = -5
        else:
            pid = lib.nsx_clone_child(cfg, pidfd, into_cgroup, stack)
            if pid < 0 and cfg.cgroup_fd >= 0:
                # CLONE_INTO_CGROUP refused (old kernel, not delegated): join
                # through cgroup.procs before SYNC_USERMAP_ACK instead.
                cfg.cgroup_fd = -1
                pid = lib.nsx_clone_child(cfg, pidfd, into_cgroup, stack)
        if pid < 0:
            raise SandboxError("clone of the sandbox child failed", step="clone_child",
                               errno=-pid)
        # From here the stages read c's buffers in place: hs keeps them alive.
        hs = Handshake(child_pid=pid, child_pidfd=pidfd[0], stack=stack[0],
                       grandchild_tid=grandchild_tid, config=(c, grandchild_tid))
        child_end.close()
        gc_end.close()
        stdio.close_child_ends()

        async def write_maps(child_pid: int) -> None:
            await write_id_maps(child_pid, list(spec.uid_ranges), list(spec.gid_ranges),
                                deny_setgroups)

        def attach_cgroup(child_pid: int) -> None:
            if cgroup is not None:
                cgroup.attach(child_pid, placed_by_clone=bool(into_cgroup[0]))

        try:
            await run_handshake(hs, child, grandchild, write_maps, attach_cgroup, fault)
        except BaseException:
            hs.abort()
            raise
        hs.release()  # the Child is reaped, the GrandChild exec'd
        proc = SandboxProcess(hs.grandchild_pid, hs.grandchild_pidfd,
                              stdin=stdio.parent_ends[0], stdout=stdio.parent_ends[1],
                              stderr=stdio.parent_ends[2], cgroup=cgroup)
        return proc
    raise AssertionError("unreachable")
