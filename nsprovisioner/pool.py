"""Warm sandboxes: kernels started ahead of their requests, each handed out once.

Nearly all of a kernel's start is its interpreter importing and initialising
ipykernel. A pool keeps `pool_size` RUNNING kernels per (kernelspec, sandbox
config), each in its own sandbox, started by zygote.py with a connection file
of the pool's own (ipc sockets in its socket dir, a key the server made for
it alone). At hand-out a side thread in the kernel takes the request's
environment, argv and connection file path (zygote.py), and launch_kernel()
returns the pooled kernel's connection info, which jupyter_client adopts: it
rewrites the requested connection file with it.

A pooled kernel is made for one Target: the interpreter, module and
arguments, the cwd (its `{cwd}` bind), the environment but for
JPY_SESSION_NAME, the runtime dirs it hides. A request with another target is
started the ordinary way and the pool is refilled for it; a kernel is never
handed out for a request it was not made for.

The runtime dir that holds connection files is hidden in a sandbox. So a
pooled sandbox gets, at the runtime dir's path, a read-only bind of a
directory of its own beside its socket dir (unlistable, as the hidden dir is)
holding the pool's connection file; at hand-out the server renames it to the
requested file's name, and it shows at that path, read-only, as in a fresh
sandbox. A pooled kernel has seen no session, no notebook's code: a kernel
whose init would run code in its user namespace says so and is not pooled.

Pools live in the server process, on its event loop thread (the sandboxes'
PR_SET_PDEATHSIG is tied to the thread that cloned them: they die with the
server, SIGKILL included). At a clean exit they are killed and their files
removed; after a SIGKILL, the next server's sweep removes their cgroups and
directories (ipcdir.sweep_dead_servers, cgroup_layout.sweep_stale_cgroups).
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import glob
import json
import logging
import os
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.connect import write_connection_file

from .cgroupfs import process_start_time
from .errors import SandboxError
from .ipcdir import SERVER_DIR_RE, expose_only, make_socket_dir, remove_socket_dir, sockets_parent
from .ipcdir import endpoint as socket_endpoint
from .jupyter_log import warnings_of_launch
from .kernelsandbox import hide_runtime_dirs
from .mounts import PathPins
from .process import SandboxProcess
from .sandbox import SandboxSpec, check_env
from .spawn import PIPE, command_env, spawn

# The kernel modules a pooled sandbox can become (the argv `python -m MODULE ...`).
MODULES = ("ipykernel_launcher", "ipykernel")
# Stands for the connection file in a Target's args.
CONNECTION_FILE = "{connection_file}"
# Set per request, read by the kernel only once it runs: not part of a Target.
LATE_ENV = frozenset({"JPY_SESSION_NAME"})
CANT_SHOW_AS = b"no-mm-map"  # what zygote.py says instead of "ready" when it can't
RAN_STARTUP_CODE = b"startup-code:"  # ... when its init ran code in the user namespace
HANDED_OUT = b"handed-out"  # its answer to the request
HAND_OUT_WAIT = 5.0  # seconds the answer may take at most (it takes well under 1 ms)
RUNTIME_SUFFIX = ".pool-runtime"  # a waiting kernel's runtime dir
HANDED_OUT_SUFFIX = ".kernel-runtime"  # renamed at hand-out (the bind inside follows)
ZYGOTE_SOURCE = (Path(__file__).parent / "zygote.py").read_text()
# Refills wait until every ordinary start's kernel listens, and this long after
# the last one did or the last hand-out (ForegroundStarts).
QUIET_BEFORE_REFILL = 0.2


def check_pool_size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxError(f"{where}: pool_size {value!r} must be a whole number >= 0 "
                           "(0: no pool)")
    return value


@dataclasses.dataclass(frozen=True)
class Target:
    """What a pooled kernel was made for; it serves only a request with the same."""

    python: str
    module: str
    args: tuple[str, ...]  # after `-m MODULE`, the connection file as CONNECTION_FILE
    kernel_name: str  # the connection file's kernel_name
    cwd: str
    env: tuple[tuple[str, str], ...]  # sorted, without LATE_ENV
    connection_dir: str  # real path; hidden in a fresh sandbox
    hidden_dirs: tuple[str, ...]  # the other runtime dirs a fresh sandbox hides
    spec: SandboxSpec  # the kernelspec's sandbox, before runtime dirs and sockets


def request_target(spec: SandboxSpec, cmd: Sequence[str], env: Mapping[str, str], cwd: str,
                   connection_file: str, runtime_dirs: Sequence[str],
                   relayed: bool, kernel_name: str, encrypted: bool) -> Target | None:
    """The Target of a launch, or None when no pooled kernel could be it (its
    output isn't relayed to the log, CurveZMQ keys a pooled kernel lacks, not a
    `python -m ipykernel...` command with the connection file as an argument)."""
    if not relayed or encrypted or len(cmd) < 4 or cmd[1] != "-m" or cmd[2] not in MODULES:
        return None
    if connection_file not in cmd[3:] or not os.path.isabs(cmd[0]):
        return None
    connection_dir = os.path.realpath(os.path.dirname(connection_file))
    fresh = hide_runtime_dirs(spec, runtime_dirs)
    if connection_dir not in fresh.hidden_paths:
        return None  # a shared dir (/tmp) that a fresh sandbox doesn't hide
    others = tuple(sorted(p for p in fresh.hidden_paths
                          if p not in spec.hidden_paths and p != connection_dir))
    full_env = command_env(spec, env)
    args = tuple(CONNECTION_FILE if a == connection_file else a for a in cmd[3:])
    return Target(python=cmd[0], module=cmd[2], args=args, kernel_name=kernel_name,
                  cwd=os.path.abspath(cwd),
                  env=tuple(sorted((k, v) for k, v in full_env.items() if k not in LATE_ENV)),
                  connection_dir=connection_dir, hidden_dirs=others, spec=spec)


class PooledKernel:
    """A running kernel waiting in its sandbox: its init, the zygote's socket, its
    connection info (ipc sockets in its socket dir, a key of its own) and its
    directories."""

    def __init__(self, name: str, target: Target, proc: SandboxProcess, channel: socket.socket,
                 socket_dir: str, runtime_dir: str, pins: PathPins,
                 connection_info: dict[str, Any], own_file: str) -> None:
        self.name = name
        self.connection_info = connection_info
        self.own_file = own_file  # its connection file, in runtime_dir
        self.warnings: list[str] = []  # what its sandbox's start left out (strict = false)
        self.target = target
        self.proc = proc
        self.channel = channel
        self.socket_dir = socket_dir
        self.runtime_dir = runtime_dir
        self.pins = pins
        self.ready = False
        self.started = time.monotonic()

    async def hand_out(self, connection_file: str, env: Mapping[str, str],
                       cmd: Sequence[str]) -> None:
        """Show the kernel's connection file at the requested path in the sandbox,
        make the running kernel the requested one; OSError when it didn't answer."""
        handed_out = self.runtime_dir[:-len(RUNTIME_SUFFIX)] + HANDED_OUT_SUFFIX
        os.rename(self.runtime_dir, handed_out)
        self.runtime_dir = handed_out
        own_file = os.path.join(self.runtime_dir, os.path.basename(self.own_file))
        os.chmod(self.runtime_dir, 0o700)
        try:
            os.rename(own_file, os.path.join(self.runtime_dir, os.path.basename(connection_file)))
        finally:
            os.chmod(self.runtime_dir, 0o111)  # as the fresh sandbox's hidden dir: no listing
        request = json.dumps({"cwd": self.target.cwd, "env": dict(env), "args": list(cmd[3:]),
                              "cmdline": list(cmd), "environ": check_env(dict(env)),
                              "connection_file": connection_file}).encode()
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.channel, request)
            self.channel.shutdown(socket.SHUT_WR)
            answer = await asyncio.wait_for(loop.sock_recv(self.channel, 64), HAND_OUT_WAIT)
        except asyncio.TimeoutError:
            raise OSError(f"no answer in {HAND_OUT_WAIT:.0f} s") from None
        finally:
            self.channel.close()
        if answer != HANDED_OUT:
            raise OSError(f"it answered {answer!r}")

    def remove_runtime_dir(self) -> None:
        if os.path.isdir(self.runtime_dir):
            os.chmod(self.runtime_dir, 0o700)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class KernelPool:
    """The waiting kernels of one (kernelspec, sandbox config)."""

    def __init__(self, kernelspec: str, spec_key: str, log: logging.Logger | Any) -> None:
        self.kernelspec = kernelspec
        self.spec_key = spec_key
        self.log = log
        self.size = 0
        self.target: Target | None = None
        self.waiting: list[PooledKernel] = []
        self.loop = _loop()
        self._filling: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self.handed_out = 0
        self.died = 0
        # what its kernels can't pass as fresh ones for: no pool for these
        self.unservable: list[Target] = []  # (a Target holds dicts: not hashable)

    # ---- what the provisioner calls -------------------------------------------------

    def take(self) -> PooledKernel | None:
        """A live ready kernel, removed from the pool (one still starting would
        make the request wait for it: a fresh start is as fast)."""
        for kernel in list(self.waiting):
            if not kernel.ready or not self._check_alive(kernel):
                continue
            self.waiting.remove(kernel)
            self._unwatch(kernel)
            self.handed_out += 1
            ForegroundStarts.handing_out()
            return kernel
        return None

    def want(self, target: Target | None, size: int, log: logging.Logger | Any) -> None:
        """Keep `size` kernels for `target` (None: none), refilled in the background."""
        self.log = log
        self.size = 0 if target in self.unservable else size
        if target != self.target:
            self.target = target
            for kernel in list(self.waiting):
                self.discard(kernel, "the pool's kernelspec request changed")
        while len(self.waiting) > size:
            self.discard(self.waiting[-1], "pool_size is smaller")
        if self.target is not None and len(self.waiting) < size and (
                self._filling is None or self._filling.done()):
            self._filling = self.loop.create_task(self._fill())

    def discard(self, kernel: PooledKernel, why: str, keep_socket_dir: bool = False) -> None:
        """Kill a kernel that will not be handed out and remove its files."""
        if kernel in self.waiting:
            self.waiting.remove(kernel)
        self.log.debug("pooled kernel %s (%s) discarded: %s", kernel.name, self.kernelspec, why)
        self._unwatch(kernel)
        kernel.channel.close()
        kernel.proc.kill()
        task = self.loop.create_task(self._reap(kernel, keep_socket_dir))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Kill every waiting kernel and wait until they and their files are gone."""
        self.size = 0
        self.target = None
        if self._filling is not None:
            self._filling.cancel()
            try:
                await self._filling
            except asyncio.CancelledError:
                pass  # what we asked for
        for kernel in list(self.waiting):
            self.discard(kernel, "the pool closes")
        while self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # ---- filling ----------------------------------------------------------------------

    async def _fill(self) -> None:
        while self.target is not None and len(self.waiting) < self.size:
            await ForegroundStarts.quiet()
            target = self.target
            if target is None or len(self.waiting) >= self.size:
                return
            try:
                kernel = await self._start(target)
            except SandboxError as e:
                self.log.error("pooled kernel for %s could not start: %s; the pool stays "
                               "short until the next kernel start", self.kernelspec, e)
                return
            if target != self.target or len(self.waiting) >= self.size:
                self.discard(kernel, "the pool's request changed while it started")
                continue
            self.waiting.append(kernel)
            self._watch(kernel)
            self.log.debug("pooled kernel %s (%s) waiting; %d of %d", kernel.name,
                           self.kernelspec, len(self.waiting), self.size)

    async def _start(self, target: Target) -> PooledKernel:
        name = f"pool{secrets.token_hex(6)}"
        socket_dir = make_socket_dir(name)
        runtime_dir = socket_dir + RUNTIME_SUFFIX
        os.mkdir(runtime_dir, 0o700)
        os.chmod(runtime_dir, 0o111)
        spec = hide_runtime_dirs(target.spec, target.hidden_dirs)
        spec = dataclasses.replace(
            spec, readonly_paths=(*spec.readonly_paths, target.connection_dir))
        spec = expose_only(spec, socket_dir)
        # its connection file, shown at the runtime dir's path inside: ipc sockets
        # in its socket dir and a key of its own, that no session has seen
        own_file = os.path.join(runtime_dir, f"kernel-{name}.json")
        os.chmod(runtime_dir, 0o700)
        _, written = write_connection_file(
            own_file, ip=socket_endpoint(socket_dir), key=str(uuid.uuid4()).encode(),
            transport="ipc", signature_scheme="hmac-sha256", kernel_name=target.kernel_name)
        os.chmod(runtime_dir, 0o111)
        info: dict[str, Any] = dict(written)
        info["key"] = info["key"].encode()  # as KernelManager.get_connection_info has it
        inside = os.path.join(target.connection_dir, os.path.basename(own_file))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pins = PathPins()
        try:
            argv = [target.python, "-c", ZYGOTE_SOURCE, target.module,
                    *(inside if a == CONNECTION_FILE else a for a in target.args)]
            with warnings_of_launch() as left_out:
                proc = await spawn(spec, argv, env=dict(target.env), cwd=target.cwd,
                                   stdin=theirs.fileno(), stdout=PIPE, stderr=PIPE,
                                   name=name, path_pins=pins,
                                   network_before_exec=False,
                                   bind_sources={target.connection_dir: runtime_dir})
        except BaseException:
            ours.close()
            os.chmod(runtime_dir, 0o700)
            shutil.rmtree(runtime_dir, ignore_errors=True)
            remove_socket_dir(socket_dir)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        kernel = PooledKernel(name, target, proc, ours, socket_dir, runtime_dir, pins, info,
                              own_file)
        kernel.warnings = list(left_out)
        return kernel

    # ---- waiting ---------------------------------------------------------------------

    def _watch(self, kernel: PooledKernel) -> None:
        self.loop.add_reader(kernel.proc.pidfd, self._check_alive, kernel)
        self.loop.add_reader(kernel.channel.fileno(), self._read_ready, kernel)

    def _unwatch(self, kernel: PooledKernel) -> None:
        if kernel.proc.pidfd >= 0:
            self.loop.remove_reader(kernel.proc.pidfd)
        if kernel.channel.fileno() >= 0:
            self.loop.remove_reader(kernel.channel.fileno())

    def _read_ready(self, kernel: PooledKernel) -> None:
        try:
            data = kernel.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.loop.remove_reader(kernel.channel.fileno())
        if data == CANT_SHOW_AS:
            self.log.error("pooled kernels of %s would show the waiting program's command "
                           "line in /proc (prctl PR_SET_MM_MAP refused); no pool for it",
                           self.kernelspec)
            self._give_up(kernel, "it can't pass for a fresh kernel")
        elif data.startswith(RAN_STARTUP_CODE):
            self.log.error("pooled kernels of %s would run startup code (%s) before the "
                           "session's environment is theirs; no pool for it (remove it, or "
                           "set pool_size 0)", self.kernelspec,
                           data[len(RAN_STARTUP_CODE):].decode(errors="replace"))
            self._give_up(kernel, "its init ran startup code")
        elif data:
            kernel.ready = True
            self.log.debug("pooled kernel %s (%s) ready after %.2f s", kernel.name,
                           self.kernelspec, time.monotonic() - kernel.started)

    def _give_up(self, kernel: PooledKernel, why: str) -> None:
        self.unservable.append(kernel.target)
        self.size = 0
        for other in list(self.waiting):
            self.discard(other, why)

    def _check_alive(self, kernel: PooledKernel) -> bool:
        """Whether a waiting kernel lives; a dead one is logged, discarded and replaced.
        (Also the pidfd's reader: readable once the init exited.)"""
        if kernel not in self.waiting:
            return False
        if kernel.proc.returncode is None and not _exited(kernel.proc):
            return True
        self._unwatch(kernel)  # before poll() reaps the init and closes its pidfd
        status = kernel.proc.poll()
        self.died += 1
        self.log.warning("pooled kernel %s (%s) died while waiting (status %s)%s",
                         kernel.name, self.kernelspec, status,
                         "; replacing it" if kernel.ready else
                         " before its imports were done; the pool stays short until the "
                         "next kernel start")
        ready = kernel.ready
        self.discard(kernel, "it died")
        if ready:
            self.want(self.target, self.size, self.log)
        else:
            self.size = 0
        return False

    async def _reap(self, kernel: PooledKernel, keep_socket_dir: bool) -> None:
        await kernel.proc.wait()
        kernel.proc.close_pipes()
        kernel.remove_runtime_dir()
        if not keep_socket_dir:
            remove_socket_dir(kernel.socket_dir)


def _exited(proc: SandboxProcess) -> bool:
    """Whether the init has exited, without reaping it (its pidfd is readable then)."""
    try:
        return os.waitid(os.P_PIDFD, proc.pidfd,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class ForegroundStarts:
    """Ordinary kernel starts whose kernel does not listen yet (the provisioner's
    launch waits for that). A start is CPU-bound imports until the kernel binds its
    sockets; refills wait for all of them, so a burst that empties the pool is not
    slowed by its refill."""

    running = 0
    last_end = 0.0

    @classmethod
    def begin(cls) -> None:
        cls.running += 1

    @classmethod
    def end(cls) -> None:
        cls.running -= 1
        cls.last_end = time.monotonic()

    @classmethod
    def handing_out(cls) -> None:
        """A pooled kernel is being handed out: its client connects and asks for
        kernel_info next, on this event loop, which a refill's spawn would hold up
        (measured: a 7 ms launch took 20-36 ms to return from start_kernel)."""
        cls.last_end = time.monotonic()

    @classmethod
    async def quiet(cls) -> None:
        while True:
            idle = time.monotonic() - cls.last_end
            if cls.running == 0 and idle >= QUIET_BEFORE_REFILL:
                return
            await asyncio.sleep(max(0.05, QUIET_BEFORE_REFILL - idle))


# ---- the server's pools ---------------------------------------------------------------

_pools: dict[tuple[str, str], KernelPool] = {}


def pool_for(kernelspec: str, spec: SandboxSpec, log: logging.Logger | Any) -> KernelPool:
    """The pool of this kernelspec and config; the kernelspec's pools of other configs
    (a config changed since) are closed. Pools of an event loop that ended are dropped
    (each test runs its own loop; a server has one)."""
    loop = _loop()
    for key, pool in list(_pools.items()):
        if pool.loop is not loop or pool.loop.is_closed():
            _kill_now(pool)
            del _pools[key]
    key = (kernelspec, repr(spec))
    for other_key, pool in list(_pools.items()):
        if other_key[0] == kernelspec and other_key != key:
            log.info("kernelspec %s: its sandbox config changed; closing its pool of %d "
                     "kernel(s) made for the old one", kernelspec, len(pool.waiting))
            del _pools[other_key]
            task = loop.create_task(pool.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
    if key not in _pools:
        _pools[key] = KernelPool(kernelspec, key[1], log)
    return _pools[key]


_closing: set[asyncio.Task[None]] = set()


def retire_pools(kernelspec: str, log: logging.Logger | Any) -> None:
    """Close the kernelspec's pools: its pool_size is 0 now."""
    for key, pool in list(_pools.items()):
        if key[0] == kernelspec and pool.loop is _loop():
            log.info("kernelspec %s: pool_size is 0 now; closing its pool", kernelspec)
            del _pools[key]
            task = pool.loop.create_task(pool.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)


def waiting_in_this_process() -> int:
    return sum(len(p.waiting) for p in _pools.values())


async def close_pools() -> None:
    """Kill every pool's kernels and remove their files (tests; a server's exit)."""
    pools = list(_pools.values())
    _pools.clear()
    for pool in pools:
        await pool.close()
    while _closing:
        await asyncio.gather(*_closing, return_exceptions=True)


def _kill_now(pool: KernelPool) -> None:
    """Without an event loop (at exit, or the loop is gone): kill, reap and remove
    synchronously. No worker thread: at exit the executors take no more work."""
    for kernel in list(pool.waiting):
        pool.waiting.remove(kernel)
        kernel.channel.close()
        proc = kernel.proc
        if proc.pidfd >= 0:
            proc.kill()
            try:
                os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED)  # SIGKILL: at once
            except ChildProcessError:
                pass  # reaped already
            os.close(proc.pidfd)
            proc.pidfd = -1
        if proc.cgroup is not None:
            proc.cgroup.kill_and_remove()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        kernel.remove_runtime_dir()
        remove_socket_dir(kernel.socket_dir)


@atexit.register
def _at_exit() -> None:
    for pool in list(_pools.values()):
        _kill_now(pool)
    _pools.clear()


def waiting_on_host() -> dict[int, int]:
    """Waiting pooled kernels of this user's live servers: {server pid: count}."""
    found: dict[int, int] = {}
    try:
        parent = sockets_parent()
    except (OSError, SandboxError):
        return found
    for entry in os.listdir(parent):
        m = SERVER_DIR_RE.fullmatch(entry)
        if not m or process_start_time(int(m[1])) != int(m[2]):
            continue
        count = len(glob.glob(os.path.join(parent, entry, "*" + RUNTIME_SUFFIX)))
        if count:
            found[int(m[1])] = count
    return found

