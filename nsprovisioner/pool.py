"""Warm sandboxes: pools of kernels started ahead of their requests.

Nearly all of a kernel's start is its interpreter importing and initialising
ipykernel. A pool keeps `pool_size` running kernels per (kernelspec, sandbox
config), each in its own sandbox and each handed out once (pooled_kernel.py:
what a pooled kernel is, how it starts and is handed out). A pool is made for
the Target of its kernelspec's newest start; a request with another target is
started the ordinary way and the pool is refilled for it.

Pools live in the server process, on its event loop thread (the sandboxes'
PR_SET_PDEATHSIG is tied to the thread that cloned them: they die with the
server, SIGKILL included). At a clean exit they are killed and their files
removed; after a SIGKILL, the next server's sweep removes their cgroups and
directories (ipcdir.sweep_dead_servers, cgroup_layout.sweep_stale_cgroups).
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import logging
import os
import time
from typing import Any

from .cgroupfs import process_start_time
from .errors import SandboxError
from .ipcdir import SERVER_DIR_RE, sockets_parent
from .pooled_kernel import RUNTIME_SUFFIX, PooledKernel, Target, start_pooled_kernel
from .sandbox import SandboxSpec
from .zygote import CANT_SHOW_AS, RAN_STARTUP_CODE  # what it says instead of "ready"

# Refills wait until every ordinary start's kernel listens, and this long after
# the last one did or the last hand-out (ForegroundStarts).
QUIET_BEFORE_REFILL = 0.2


def check_pool_size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SandboxError(f"{where}: pool_size {value!r} must be a whole number >= 0 "
                           "(0: no pool)")
    return value


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


class KernelPool:
    """The waiting kernels of one (kernelspec, sandbox config)."""

    def __init__(self, kernelspec: str, log: logging.Logger | Any) -> None:
        self.kernelspec = kernelspec
        self.log = log
        self.size = 0
        self.target: Target | None = None
        self.waiting: list[PooledKernel] = []
        self.loop = _loop()
        self._filling: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
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
        while len(self.waiting) > self.size:
            self.discard(self.waiting[-1], "pool_size is smaller")
        if self.target is not None and len(self.waiting) < self.size and (
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
        task = self.loop.create_task(kernel.reap(keep_socket_dir))
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
                kernel = await start_pooled_kernel(target)
            except (SandboxError, OSError) as e:
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
        if not kernel.proc.exited():
            return True
        self._unwatch(kernel)  # before poll() reaps the init and closes its pidfd
        status = kernel.proc.poll()
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
            _close_later(other_key)
    if key not in _pools:
        _pools[key] = KernelPool(kernelspec, log)
    return _pools[key]


def retire_pools(kernelspec: str, log: logging.Logger | Any) -> None:
    """Close the kernelspec's pools: its pool_size is 0 now."""
    for key, pool in list(_pools.items()):
        if key[0] == kernelspec and pool.loop is _loop():
            log.info("kernelspec %s: pool_size is 0 now; closing its pool", kernelspec)
            _close_later(key)


_closing: set[asyncio.Task[None]] = set()


def _close_later(key: tuple[str, str]) -> None:
    """Take the pool out of use now; its kernels go in the background."""
    pool = _pools.pop(key)
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
    """Without an event loop (at exit, or the loop is gone)."""
    while pool.waiting:
        pool.waiting.pop().kill_now()


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

