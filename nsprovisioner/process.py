"""SandboxProcess: the sandbox's init, held by a pidfd.

The init is a direct child of the caller (the GrandChild was cloned with
CLONE_PARENT), so the caller reaps it; the pidfd makes signals and waits
race-free against pid reuse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from .handshake import readable

if TYPE_CHECKING:
    from .cgroups import SandboxCgroup


class SandboxProcess:
    """A running sandbox, like asyncio.subprocess.Process but held by a pidfd.

    `returncode` is the init's exit status: the command's exit code, 128+N
    when the command died of signal N, or -N when the init itself was killed
    by signal N (as with subprocess).
    """

    def __init__(self, pid: int, pidfd: int, *, stdin: IO[bytes] | None = None,
                 stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None,
                 cgroup: SandboxCgroup | None = None) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.cgroup = cgroup
        self._exit_callbacks: list[Callable[[SandboxProcess], None]] = []
        self._cgroup_removed: concurrent.futures.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<SandboxProcess pid={self.pid} returncode={self.returncode}>"

    def add_exit_callback(self, callback: Callable[[SandboxProcess], None]) -> None:
        """Run `callback(self)` once, right after the init has been reaped."""
        if self.returncode is not None:
            callback(self)
        else:
            self._exit_callbacks.append(callback)

    def poll(self) -> int | None:
        """Reap the init if it has exited; its returncode, or None."""
        if self.returncode is not None:
            return self.returncode
        try:
            result = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            self._set_returncode(-signal.SIGKILL)  # reaped by someone else
            return self.returncode
        if result is None:
            return None
        if result.si_code == os.CLD_EXITED:
            self._set_returncode(result.si_status)
        else:
            self._set_returncode(-result.si_status)
        return self.returncode

    def _set_returncode(self, code: int) -> None:
        self.returncode = code
        os.close(self.pidfd)
        self.pidfd = -1
        callbacks, self._exit_callbacks = self._exit_callbacks, []
        for callback in callbacks:
            callback(self)
        # Whatever the command left behind (daemons in other sessions can't
        # exist: the pid namespace died with the init) goes with its cgroup;
        # removing it may wait for killed processes: not on the event loop.
        if self.cgroup is not None:
            self._cgroup_removed = self.cgroup.remove_in_background()

    def exited(self) -> bool:
        """Whether the init has exited, without reaping it: its pidfd stays open (an
        event loop may still be watching it) until poll() or wait() reaps it."""
        if self.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PIDFD, self.pidfd,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill_now(self) -> None:
        """SIGKILL the init, reap it and remove its cgroup here and now: for when no
        event loop is left, or no worker thread (at exit the executors take no more
        work, and poll() would hand the cgroup to one)."""
        cgroup, self.cgroup = self.cgroup, None
        if self.returncode is None:
            self.kill()
            try:  # SIGKILL: at once; poll() then reaps it with its status
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass  # reaped by someone else: poll() says so
            self.poll()
        if cgroup is not None:
            cgroup.kill_and_remove()
        self.close_pipes()

    async def wait(self) -> int:
        """Wait for the init to exit (and its cgroup to be removed); its returncode."""
        while self.poll() is None:
            await readable(self.pidfd)
        if self._cgroup_removed is not None:
            await asyncio.wrap_future(self._cgroup_removed)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the init, which forwards the signal to the command's process group."""
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass  # exited; not yet reaped

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the init; the kernel then kills everything in its pid namespace."""
        self.send_signal(signal.SIGKILL)

    def close_pipes(self) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
