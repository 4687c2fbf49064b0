"""spawn(): start a command in a new sandbox and hand back its init.

This is the Parent of the seed's diagram. It validates and plans everything
the helper (csrc/, the seed's Child and GrandChild, then the init) needs,
starts the helper through csrc/nsclone.c, sends it the plan, drives the
handshake (handshake.py), and on any failure kills and reaps what it started
and closes every fd it opened before raising one SandboxError.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import IO, Any

from ._nsexec import ffi, lib
from .cgroup_layout import sandbox_dir_name
from .cgroup_view import with_cgroup_view
from .cgroups import SandboxCgroup, create_cgroup
from .egress import Egress, egress_counters
from .errors import STEP_VALUES, SandboxError
from .handshake import Handshake, SyncChannel, run_handshake
from .idmap import check_helper_map, needs_helper, write_id_maps
from .initexe import helper_command
from .mounts import MountOp, PathPins, plan_mounts
from .plan import Plan
from .process import SandboxProcess
from .protect import SANDBOX_SITE, sandbox_state_env, state_paths
from .sandbox import SandboxSpec, check_argv, check_env
from .sandbox_cgroup import removal_of
from .seccomp import build_filter

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
Stdio = int | IO[Any] | None

CLONE_FLAGS = {"mount": lib.CLONE_NEWNS, "uts": lib.CLONE_NEWUTS, "ipc": lib.CLONE_NEWIPC,
               "pid": lib.CLONE_NEWPID, "net": lib.CLONE_NEWNET}
# How the fault switch (tests only) makes its step fail.
FAULT_KINDS = {"eio": lib.NSX_FAULT_EIO, "segv": lib.NSX_FAULT_SEGV,
               "abrt": lib.NSX_FAULT_ABRT, "memory": lib.NSX_FAULT_MEMORY}


def resolve_command(name: str, env: Mapping[str, str]) -> str:
    """argv[0] as a path, as the host sees it (the mount plan protects its prefix)."""
    if "/" in name:
        return name
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name


def check_cwd(cwd: str | os.PathLike[str] | None) -> str:
    path = os.path.abspath(os.fspath(cwd)) if cwd is not None else os.getcwd()
    if "\0" in path:
        raise SandboxError(f"cwd {path!r} contains a NUL byte")
    if not os.path.isdir(path):
        raise SandboxError(f"cwd {path} does not exist or is not a directory", step="chdir")
    return path


def command_env(spec: SandboxSpec, env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment the command gets for `env` (None: this process's)."""
    environ = dict(os.environ if env is None else env)
    # Home's dot entries are read-only inside (protect.py): tools write their
    # caches and state into the sandbox's state dir instead, unless the
    # caller (the provisioner, for one kernelspec) already said where.
    for key, value in sandbox_state_env(state_paths(spec, "default"), environ).items():
        if key not in environ or (key == "PYTHONPATH" and SANDBOX_SITE not in
                                  environ[key].split(os.pathsep)):
            environ[key] = value
    return environ


USER_COUNTERS_DIR = "/proc/sys/user"


def user_counters(spec: SandboxSpec) -> list[tuple[str, str]]:
    """(file, value) for the /proc/sys/user counters this host has, lowered only: a
    value above the host's own per-user limit would mean nothing."""
    out = []
    wanted = egress_counters(spec.user_counters) if spec.network == "egress" else spec.user_counters
    for name, value in wanted.items():
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
    network_before_exec: bool = True,
    bind_sources: Mapping[str, str] | None = None,
    _fault_step: str | None = None,
    _fault_kind: str = "eio",
) -> SandboxProcess:
    """Start `argv` in a new sandbox described by `spec`; returns once it is exec'd.

    stdin/stdout/stderr: None (inherit), DEVNULL, PIPE, an fd or a file.
    `name` names the sandbox's cgroup (e.g. the kernel id); a random one by default.
    `path_pins`: what the configured paths resolved to at the first of a
    series of starts (a kernel and its restarts); a path that resolves
    elsewhere now fails the start.
    `network_before_exec` (network "egress"): the command starts once pasta is
    up. False lets it start meanwhile; spawn() still returns only once pasta is
    up (a kernel, whose code arrives after that).
    `bind_sources`: read-only paths of `spec` that show another host directory
    (mounts.plan_mounts' `sources`).
    `_fault_step` (tests only) makes the named step fail, in the way
    `_fault_kind` names: "eio", "segv", "abrt", or "memory" (the stage runs
    into its cgroup's memory limit).
    """
    if not isinstance(spec, SandboxSpec):
        raise SandboxError(f"spec must be a SandboxSpec, not {type(spec).__name__}")
    args = check_argv(argv)
    environ = command_env(spec, env)
    envp = check_env(environ)
    workdir = check_cwd(cwd)
    fault = 0
    if _fault_step is not None:
        if _fault_step not in STEP_VALUES:
            raise SandboxError(f"unknown fault step {_fault_step!r}")
        fault = STEP_VALUES[_fault_step]
    if _fault_kind not in FAULT_KINDS:
        raise SandboxError(f"unknown fault kind {_fault_kind!r}")
    deny_setgroups = os.geteuid() != 0 and not needs_helper(list(spec.gid_ranges), os.getegid())
    for ranges, kind, own in ((spec.uid_ranges, "uid_map", os.geteuid()),
                              (spec.gid_ranges, "gid_map", os.getegid())):
        if needs_helper(list(ranges), own):
            check_helper_map(list(ranges), kind, own)

    mounts = plan_mounts(spec, workdir, argv0=resolve_command(args[0], environ),
                         pins=path_pins, sources=bind_sources)
    seccomp_filter = build_filter(spec.seccomp, spec.strict)
    if name:  # a restart: the last start's cgroup of this name must be gone
        await removal_of(sandbox_dir_name(name))
    cgroup = create_cgroup(spec, name)
    try:
        return await _clone_and_handshake(spec, args, envp, workdir,
                                          with_cgroup_view(mounts, spec, cgroup),
                                          seccomp_filter, cgroup, fault,
                                          FAULT_KINDS[_fault_kind], deny_setgroups,
                                          (stdin, stdout, stderr), pass_fds,
                                          network_before_exec)
    except BaseException:
        if cgroup is not None:
            await asyncio.wrap_future(cgroup.remove_in_background())
        raise


async def _clone_and_handshake(
    spec: SandboxSpec, args: list[str], envp: list[str],
    workdir: str, mounts: Sequence[MountOp], seccomp_filter: bytes | None,
    cgroup: SandboxCgroup | None, fault: int, fault_kind: int, deny_setgroups: bool,
    stdio_specs: tuple[Stdio, Stdio, Stdio], pass_fds: Sequence[int],
    network_before_exec: bool,
) -> SandboxProcess:
    with ExitStack() as stack:
        stdio = _Stdio(stack)
        for dst, s in enumerate(stdio_specs):
            stdio.add(dst, s)
        for fd in pass_fds:
            stdio.pairs.append((fd, fd))
        sync_target = max(3, max(dst for _, dst in stdio.pairs) + 1)

        child_parent, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc_parent, gc_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stack.callback(child_end.close)
        stack.callback(gc_end.close)
        child = SyncChannel(child_parent, "child")
        grandchild = SyncChannel(gc_parent, "grandchild")
        stack.callback(child.close)
        stack.callback(grandchild.close)

        egress = (Egress(spec.egress_deny, spec.strict, stack, before_exec=network_before_exec)
                  if spec.network == "egress" else None)
        plan = Plan(
            parent_pid=os.getpid(),
            unshare_flags=sum(CLONE_FLAGS[n] for n in spec.namespaces if n in CLONE_FLAGS),
            unshare_cgroup="cgroup" in spec.namespaces,
            loopback_up="net" in spec.namespaces,
            uid=spec.uid, gid=spec.gid, drop_groups=not deny_setgroups,
            hostname=spec.hostname if "uts" in spec.namespaces else None,
            cwd=workdir, mounts=mounts,
            fds=[(i, dst) for i, (_, dst) in enumerate(stdio.pairs)],
            sync_target_fd=sync_target, init=spec.init, seccomp_filter=seccomp_filter,
            user_counters=user_counters(spec), rlimits=rlimits(spec),
            fault_step=fault, fault_kind=fault_kind,
            **(egress.plan_fields(len(stdio.pairs)) if egress else {}),
        ).encode()

        exec_fd, path, prefix = helper_command()
        helper_argv = [*prefix, "--sync-fd", str(child_end.fileno()), "--", *args]
        hs = Handshake()
        try:
            hs.child_pid, hs.child_pidfd, into_cgroup = _start_helper(
                exec_fd, path, helper_argv, envp, child_end.fileno(),
                cgroup.clone_fd if cgroup is not None else -1, fault)
            child_end.close()
            await child.send_plan(plan, [gc_end.fileno(), *(src for src, _ in stdio.pairs),
                                         *(egress.passed_fd() if egress else [])])
            gc_end.close()
            stdio.close_child_ends()
            if egress:
                egress.close_child_end()
                egress.begin()

            async def write_maps(child_pid: int) -> None:
                await write_id_maps(child_pid, list(spec.uid_ranges), list(spec.gid_ranges),
                                    deny_setgroups)

            def attach_cgroup(child_pid: int) -> None:
                if cgroup is not None:
                    cgroup.attach(child_pid, placed_by_clone=into_cgroup)

            await run_handshake(hs, child, grandchild, write_maps, attach_cgroup, fault)
        except BaseException:
            await hs.abort()
            if egress:
                egress.reraise()
            raise
        proc = SandboxProcess(hs.grandchild_pid, hs.take_grandchild_pidfd(),
                              stdin=stdio.parent_ends[0], stdout=stdio.parent_ends[1],
                              stderr=stdio.parent_ends[2], cgroup=cgroup)
        if egress:
            try:
                await egress.attach(proc)
            except BaseException:
                proc.kill()
                await proc.wait()
                raise
        return proc
    raise AssertionError("unreachable")


def _start_helper(exec_fd: int, path: str, argv: list[str], envp: list[str], sync_fd: int,
                  cgroup_fd: int, fault: int) -> tuple[int, int, bool]:
    """Clone and exec the helper: (pid, pidfd, placed in the cgroup by the clone)."""
    if fault == STEP_VALUES["clone_child"]:
        raise SandboxError("injected fault at clone_child", step="clone_child", errno=5)
    keep = [ffi.new("char[]", a.encode()) for a in argv]
    c_argv = ffi.new("char *[]", [*keep, ffi.NULL])
    keep_env = [ffi.new("char[]", e.encode()) for e in envp]
    c_envp = ffi.new("char *[]", [*keep_env, ffi.NULL])
    c_path = ffi.new("char[]", path.encode())
    pidfd = ffi.new("int *")
    exec_failed = ffi.new("int *")
    memfd_errno = ffi.new("int *")
    pid = lib.nsx_start_helper(exec_fd, c_path, c_argv, c_envp, sync_fd, cgroup_fd, pidfd,
                               exec_failed, memfd_errno)
    into_cgroup = cgroup_fd >= 0
    if pid < 0 and not exec_failed[0] and cgroup_fd >= 0:
        # CLONE_INTO_CGROUP refused (not delegated, a v1 hierarchy): join
        # through cgroup.procs before SYNC_USERMAP_ACK instead.
        into_cgroup = False
        pid = lib.nsx_start_helper(exec_fd, c_path, c_argv, c_envp, sync_fd, -1, pidfd,
                                   exec_failed, memfd_errno)
    if pid < 0 and exec_failed[0]:
        memfd = (f" (its sealed copy's exec failed first: {os.strerror(memfd_errno[0])})"
                 if memfd_errno[0] else "")
        raise SandboxError(f"exec of the sandbox helper {path} failed{memfd}", step="clone_child",
                           errno=-pid, hint="reinstall nsprovisioner; `jupyter nsprovisioner "
                           "doctor` checks the helper")
    if pid < 0:
        raise SandboxError("clone of the sandbox helper failed", step="clone_child", errno=-pid)
    return pid, pidfd[0], into_cgroup
