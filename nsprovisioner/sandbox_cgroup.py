"""SandboxCgroup: the cgroup directories of one sandbox, from attach to removal.

A sandbox has one directory in the cgroup v2 hierarchy (placement, kill,
the cgroup namespace's root) and/or one per v1 hierarchy that carries a
limit or accounting (memory, pids, cpu, cpuacct, freezer). cgroups.py
creates them; this class moves the Child in, reads what the kernel counts,
and kills and removes it all at the end.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from .cgroup_layout import group_lock
from .cgroupfs import CgroupHost, Hierarchy, parse_keyed, read_keyed, read_pids
from .errors import SandboxError

log = logging.getLogger(__name__)

REMOVE_TIMEOUT = 10.0  # SIGKILLed processes exit in ms; this only bounds a stuck one
FREEZE_TIMEOUT = 2.0
# Accounting files only cgroup v1 has (v2: memory.events, memory.current, cpu.stat)
V1_ONLY_FILES = frozenset({"memory.oom_control", "memory.usage_in_bytes", "cpuacct.usage"})
# usage() files of "key value" lines: the key it reads
KEYED_COUNTERS = {"cpu.stat": "usage_usec", "pids.events": "max"}


# Removal waits for killed processes to exit, so it runs off the event loop;
# a restarted kernel reuses its directory name, so its start waits for the
# removal of the same name (removal_of).
_remover = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                 thread_name_prefix="nsprov-cgroup")
_removing: dict[str, concurrent.futures.Future[None]] = {}
_removing_lock = threading.Lock()


async def removal_of(dir_name: str) -> None:
    """Wait until the sandbox cgroup named `dir_name` being removed is gone."""
    with _removing_lock:
        pending = _removing.get(dir_name)
    if pending is not None:
        await asyncio.wrap_future(pending)


@dataclass(frozen=True)
class CgroupDir:
    """One directory of a sandbox; `limits`: the controllers whose limits it carries."""

    path: str
    hierarchy: Hierarchy
    limits: frozenset[str] = frozenset()

    @property
    def version(self) -> int:
        return self.hierarchy.version

    def has(self, controller: str) -> bool:
        return controller in self.hierarchy.controllers


class SandboxCgroup:
    """The cgroup(s) of one sandbox."""

    def __init__(self, host: CgroupHost, dirs: list[CgroupDir], group_dirs: list[str],
                 *, clone_fd: int = -1, strict: bool = True) -> None:
        self.host = host
        self.dirs = dirs
        self.group_dirs = group_dirs  # the per-server parents, removed when empty
        self.clone_fd = clone_fd  # a cgroup v2 directory fd for CLONE_INTO_CGROUP, or -1
        self.paths = [d.path for d in dirs]
        self.strict = strict
        self.removed = False
        self._owner = os.getpid()
        self._final_oom = 0
        self._final_usage: dict[str, float] = {}
        _live.add(self)

    def __repr__(self) -> str:
        return f"<SandboxCgroup {' '.join(self.paths)}{' removed' if self.removed else ''}>"

    @property
    def v2_dir(self) -> CgroupDir | None:
        return next((d for d in self.dirs if d.version == 2), None)

    def attach(self, pid: int, *, placed_by_clone: bool) -> None:
        """Move the Child into every directory clone3 did not put it in.

        Called before SYNC_USERMAP_ACK: the Child has created nothing yet, so
        everything the sandbox ever runs starts inside.
        """
        for d in self.dirs:
            if d.version == 2 and placed_by_clone:
                continue
            procs = os.path.join(d.path, "cgroup.procs")
            try:
                self.host.write(procs, str(pid))
            except OSError as e:
                message = f"can't move the sandbox (pid {pid}) into the cgroup {d.path}"
                if d.limits and self.strict:
                    raise SandboxError(message, step="cgroup_attach", errno=e.errno or 0,
                                       hint=f"make {procs} writable by uid {os.geteuid()}, or "
                                       "set strict = false (--no-strict) to start without "
                                       f"the {', '.join(sorted(d.limits))} limit") from None
                level = logging.WARNING if d.limits else logging.DEBUG
                log.log(level, "%s: %s; the sandbox runs without it", message,
                        os.strerror(e.errno or 0))

    def _read_probe(self, controller: str, probe: str) -> str | None:
        """The file `probe` of the first directory in which the kernel counts `controller`.

        None when no directory has it; OSError when the one that has it can't be read.
        """
        for d in self.dirs:
            if d.version == 2 and probe in V1_ONLY_FILES:
                continue  # cgroup v2 has other names for them: needless lookups
            if d.version == 2 or d.has(controller):
                try:
                    return self.host.read(os.path.join(d.path, probe))
                except FileNotFoundError:
                    continue  # the read is the existence check
        return None

    def oom_kill_count(self) -> int:
        """How many processes the OOM killer killed in this sandbox."""
        if self.removed:
            return self._final_oom
        for probe in ("memory.events", "memory.oom_control"):
            try:
                text = self._read_probe("memory", probe)
            except OSError:
                return 0
            if text is not None:
                return parse_keyed(text).get("oom_kill", 0)
        return 0

    def usage(self) -> dict[str, float]:
        """memory_bytes, pids, cpu_seconds and pids_limit_hits (the forks and clones the
        pids limit refused), each where the host counts it."""
        if self.removed:
            return dict(self._final_usage)
        return self._read_usage(count_pids=True)

    def _read_usage(self, count_pids: bool) -> dict[str, float]:
        found: dict[str, float] = {}
        sources = (("memory_bytes", "memory", "memory.current", 1.0),
                   ("memory_bytes", "memory", "memory.usage_in_bytes", 1.0),
                   ("pids", "pids", "pids.current", 1.0),
                   ("cpu_seconds", "cpu", "cpu.stat", 1e-6),
                   ("cpu_seconds", "cpuacct", "cpuacct.usage", 1e-9),
                   ("pids_limit_hits", "pids", "pids.events", 1.0))
        for key, controller, probe, scale in sources:
            if key in found:
                continue
            try:
                text = self._read_probe(controller, probe)
            except OSError:
                continue
            if text is None:
                continue
            if probe in KEYED_COUNTERS:
                value = parse_keyed(text).get(KEYED_COUNTERS[probe])
                if value is not None:
                    found[key] = value * scale
            elif text.strip().isdigit():
                found[key] = int(text) * scale
        if count_pids and "pids" not in found and self.dirs:
            try:
                found["pids"] = float(len(read_pids(self.host, self.dirs[0].path)))
            except OSError:
                pass
        return found

    def remove_in_background(self) -> concurrent.futures.Future[None]:
        """kill_and_remove() in a worker thread; its future."""
        name = os.path.basename(self.paths[0]) if self.paths else ""
        with _removing_lock:
            pending = _removing[name] = _remover.submit(self.kill_and_remove)

        def forget(done: concurrent.futures.Future[None]) -> None:
            with _removing_lock:
                if _removing.get(name) is done:
                    del _removing[name]

        pending.add_done_callback(forget)
        return pending

    def kill_and_remove(self) -> None:
        """Kill everything left inside and remove the cgroup; idempotent."""
        if self.removed:
            return
        try:
            self._kill()
        except OSError as e:
            log.warning("killing what is left in the cgroup %s failed: %s", self.paths, e)
        self._final_oom = self.oom_kill_count()
        # all killed: no need to count what cgroup.procs lists
        self._final_usage = {**self._read_usage(count_pids=False), "pids": 0.0}
        self.removed = True
        _live.discard(self)
        deadline = time.monotonic() + REMOVE_TIMEOUT
        for d in self.dirs:
            _remove_dir(self.host, d.path, deadline)
        with group_lock:
            for group in self.group_dirs:
                try:
                    self.host.remove_dir(group)
                except OSError:
                    pass  # other sandboxes of this server still live in it
        if self.clone_fd >= 0:
            os.close(self.clone_fd)
            self.clone_fd = -1

    def _kill(self) -> None:
        v2 = self.v2_dir
        freezer = next((d for d in self.dirs if d.version == 1 and d.has("freezer")), None)
        if v2 is not None and _write_if_present(self.host, v2.path, "cgroup.kill", "1"):
            pass  # Linux 5.14+: one write kills everything inside
        elif v2 is not None and self.host.exists(os.path.join(v2.path, "cgroup.freeze")):
            _freeze_and_kill(self.host, v2.path, "cgroup.freeze", "1", "0")
        elif freezer is not None:
            _freeze_and_kill(self.host, freezer.path, "freezer.state", "FROZEN", "THAWED")
        for d in self.dirs:
            _kill_until_empty(self.host, d.path)


def _write_if_present(host: CgroupHost, path: str, control: str, text: str) -> bool:
    """Write an interface file; False when the kernel has no such file (one lookup, not two)."""
    try:
        host.write(os.path.join(path, control), text)
    except FileNotFoundError:
        return False
    return True


def _freeze_and_kill(host: CgroupHost, path: str, control: str, frozen: str,
                     thawed: str) -> None:
    """Kill a cgroup without cgroup.kill: frozen, its processes can't fork away."""
    host.write(os.path.join(path, control), frozen)
    try:
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while time.monotonic() < deadline and not _is_frozen(host, path, control, frozen):
            time.sleep(0.005)
        for pid in read_pids(host, path):
            _kill_pid(pid)
    finally:
        # SIGKILL takes effect only once a frozen task runs again
        host.write(os.path.join(path, control), thawed)


def _is_frozen(host: CgroupHost, path: str, control: str, frozen: str) -> bool:
    if control == "freezer.state":
        return host.read(os.path.join(path, control)).strip() == frozen
    return read_keyed(host, os.path.join(path, "cgroup.events")).get("frozen") == 1


def _kill_until_empty(host: CgroupHost, path: str) -> None:
    """SIGKILL what cgroup.procs lists until it lists nothing (or time runs out)."""
    deadline = time.monotonic() + REMOVE_TIMEOUT
    delay = 0.001
    while True:
        pids = read_pids(host, path)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            _kill_pid(pid)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_dir(host: CgroupHost, path: str, deadline: float) -> None:
    """rmdir, retried while killed processes finish exiting."""
    delay = 0.001
    while True:
        try:
            host.remove_dir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("the cgroup %s could not be removed: %s; the next server start "
                            "sweeps it", path, os.strerror(e.errno or 0))
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# Sandboxes still running when the server exits go with it: PR_SET_PDEATHSIG
# kills their inits, and this removes their cgroups. Strong references: a
# sandbox nobody waits for any more still has a cgroup to remove.
_live: set[SandboxCgroup] = set()


@atexit.register
def _remove_live_cgroups() -> None:
    for cgroup in list(_live):
        if cgroup._owner == os.getpid():  # not in a forked child of the server
            cgroup.kill_and_remove()
