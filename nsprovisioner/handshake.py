"""The Parent's side of the seed's handshake, on asyncio.

    Parent -> Child:       clone + exec of the helper (nsx_start_helper), the plan
    Child  -> Parent:      SYNC_USERMAP_PLS    Parent writes setgroups, uid_map, gid_map
    Parent -> Child:       SYNC_USERMAP_ACK
    Child  -> Parent:      SYNC_RECVPID_PLS    (child pid, grandchild pid)
    Parent -> Child:       SYNC_RECVPID_ACK
    Child  -> Parent:      SYNC_CHILD_READY    Parent reaps the Child
    Parent -> GrandChild:  SYNC_GRANDCHILD
    GrandChild -> Parent:  SYNC_CHILD_READY, then EOF once the command is exec'd

Any stage may send SYNC_ERROR instead; it becomes a SandboxError.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._nsexec import ffi, lib
from .errors import STEP_VALUES, SandboxError

MSG_SIZE = ffi.sizeof("struct nsx_msg")
# struct nsx_msg as the struct module reads it (faster than a cffi cast per
# record): type, stage, step, err, pid[2], detail
MSG = struct.Struct(f"=6i{lib.NSX_DETAIL_MAX}s")
assert MSG.size == MSG_SIZE, "struct nsx_msg changed: update MSG"
SYNC_NAMES = {value: name.removeprefix("NSX_") for value, name in
              ffi.typeof("enum nsx_sync").elements.items()}
# Each stage answers in milliseconds; this only catches a hang (e.g. a stuck
# newuidmap or a frozen cgroup), which is reported instead of waited out.
HANDSHAKE_TIMEOUT = 30.0


@dataclass
class Message:
    type: int
    stage: int = 0
    step: int = 0
    err: int = 0
    pids: tuple[int, int] = (0, 0)
    detail: str = ""


class SyncChannel:
    """The Parent's end of one sync socket (SOCK_SEQPACKET: one record per recv).

    The socket stays registered with the loop from the first wait until EOF
    or close, and whatever arrives is queued: a start waits on each channel
    several times, and adding and removing the reader around every record
    cost more than the wait.
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._records: collections.deque[bytes] = collections.deque()  # b"": EOF
        self._eof = False
        self._reset = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _fill(self) -> None:
        """Queue every record the socket holds, and b"" once the peer is gone."""
        while not self._eof:
            try:
                data = self.sock.recv(MSG_SIZE)
            except BlockingIOError:
                if not self._reset:
                    return
                data = b""  # reset, and nothing queued behind it: gone
            except ConnectionResetError:
                # When the peer exits with a message of ours unread, Linux
                # reports ECONNRESET once, ahead of the records the peer
                # queued before exiting (its error record among them).
                self._reset = True
                continue
            self._records.append(data)
            if not data:
                self._eof = True
                self._stop_reading()  # an EOF socket is always readable

    def _on_readable(self) -> None:
        self._fill()
        if self._records and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _stop_reading(self) -> None:
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    async def _next(self) -> bytes:
        self._fill()
        while not self._records:
            loop = asyncio.get_running_loop()
            if self._loop is None:
                loop.add_reader(self.sock.fileno(), self._on_readable)
                self._loop = loop
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._records.popleft()

    async def recv(self, step: str) -> Message | None:
        """The next record, or None at EOF. Error records are raised."""
        data = await self._next()
        if not data:
            return None
        msg = self._parse(data, step)
        if msg.type == lib.NSX_SYNC_ERROR:
            raise SandboxError.from_record(msg.stage, msg.step, msg.err, msg.detail,
                                           grandchild_pid=msg.pids[1])
        return msg

    def _parse(self, data: bytes, step: str) -> Message:
        if len(data) != MSG_SIZE:
            raise SandboxError(f"the {self.peer} sent a record of {len(data)} bytes", step=step)
        type_, stage, step_no, err, pid0, pid1, detail = MSG.unpack(data)
        return Message(type_, stage, step_no, err, (pid0, pid1),
                       detail.partition(b"\0")[0].decode(errors="replace"))

    def raise_pending_error(self) -> None:
        """Raise the peer's error record if one is already queued: when the
        Parent's own step failed because the peer died, the record says why."""
        self._fill()
        if self._records and len(self._records[0]) == MSG_SIZE:
            msg = self._parse(self._records[0], "")
            if msg.type == lib.NSX_SYNC_ERROR:
                raise SandboxError.from_record(msg.stage, msg.step, msg.err, msg.detail,
                                               grandchild_pid=msg.pids[1])

    async def expect(self, sync_type: int, step: str) -> Message:
        msg = await self.recv(step)
        if msg is None:
            raise SandboxError(
                f"the {self.peer} exited before sending {SYNC_NAMES[sync_type]}", step=step)
        if msg.type != sync_type:
            raise SandboxError(f"the {self.peer} sent {SYNC_NAMES.get(msg.type, msg.type)} "
                               f"instead of {SYNC_NAMES[sync_type]}", step=step)
        return msg

    async def send_plan(self, plan: bytes, fds: list[int]) -> None:
        """The plan, with the fds it names, as one record (csrc/nsexec.h)."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        while True:
            try:
                self.sock.sendmsg([plan], rights)
                return
            except BlockingIOError:
                await writable(self.sock.fileno())
            except OSError as e:
                await self.recv("read_plan")  # the Child's error record, if it sent one
                raise SandboxError("the child exited before it got the plan", step="read_plan",
                                   errno=e.errno or 0) from None

    async def send(self, sync_type: int, step: str) -> None:
        try:
            self.sock.send(MSG.pack(sync_type, 0, 0, 0, 0, 0, b""))
        except OSError:
            # The peer is gone: its error record, if it sent one, says why.
            await self.recv(step)
            raise SandboxError(f"the {self.peer} exited before {SYNC_NAMES[sync_type]}",
                               step=step) from None

    def close(self) -> None:
        self._stop_reading()
        self.sock.close()


@dataclass
class Handshake:
    """What the Parent learns during the handshake, and what it must undo on failure.

    `child_userns` is the Child's user namespace (device, inode), seen while
    it asks for its maps: should the Child die after cloning the GrandChild
    but before reporting its pid, the GrandChild is our child in that
    namespace, and abort() finds it there.
    """

    child_pid: int = 0
    child_pidfd: int = -1
    grandchild_pid: int = 0
    grandchild_pidfd: int = -1
    child_userns: tuple[int, int] | None = None

    def take_grandchild_pidfd(self) -> int:
        fd, self.grandchild_pidfd, self.grandchild_pid = self.grandchild_pidfd, -1, 0
        return fd

    async def abort(self) -> None:
        """Kill and reap whatever was started; close the pidfds."""
        if not self.grandchild_pid and self.child_userns is not None:
            found = children_in_user_namespace(self.child_userns)
            self.grandchild_pid = found[0] if found else 0
        for pid, fd in ((self.child_pid, self.child_pidfd),
                        (self.grandchild_pid, self.grandchild_pidfd)):
            if pid > 0:
                await _kill_and_reap(pid, fd)
            if fd >= 0:
                os.close(fd)
        self.child_pid = self.grandchild_pid = 0
        self.child_pidfd = self.grandchild_pidfd = -1


def children_in_user_namespace(userns: tuple[int, int]) -> list[int]:
    """Our children in the user namespace `userns` (device, inode)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            st = os.stat(f"/proc/{name}/ns/user")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to look at
        if (st.st_dev, st.st_ino) == userns:
            found.append(int(name))
    return found


async def _kill_and_reap(pid: int, pidfd: int) -> None:
    """SIGKILL, then reap once the pidfd says it exited (the loop runs on)."""
    owned = pidfd < 0
    if owned:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
    try:
        _pidfd_kill(pidfd)
        try:
            await asyncio.wait_for(readable(pidfd), HANDSHAKE_TIMEOUT)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass  # cancelled again: the wait below is short, the process is dying
        try:
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED)  # noqa: ASYNC222 - it has exited
        except ChildProcessError:
            pass
    finally:
        if owned:
            os.close(pidfd)


def _pidfd_kill(fd: int) -> None:
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fault(fault_step: int, name: str) -> None:
    if fault_step == STEP_VALUES[name]:
        raise SandboxError(f"injected fault at {name}", step=name, errno=5)


async def readable(fd: int) -> None:
    """Wait until `fd` (e.g. a pidfd, readable once its process exits) is readable."""
    await _ready(fd, write=False)


async def writable(fd: int) -> None:
    await _ready(fd, write=True)


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _reap(pid: int, pidfd: int) -> int:
    """Wait for a process that is about to exit, without blocking the loop."""
    await readable(pidfd)
    # the pidfd is readable: the process has exited, so this does not block
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)  # noqa: ASYNC222
    if result is None:
        raise SandboxError(f"process {pid} was readable but not exited", step="reap_child")
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


async def run_handshake(
    hs: Handshake,
    child: SyncChannel,
    grandchild: SyncChannel,
    write_maps: Callable[[int], Awaitable[None]],
    attach_cgroup: Callable[[int], None],
    fault_step: int = 0,
) -> None:
    """Drive the Child and GrandChild from clone to exec; raises SandboxError."""
    drive = _drive(hs, child, grandchild, write_maps, attach_cgroup, fault_step)
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):  # no task of its own
                await drive
        else:
            await asyncio.wait_for(drive, HANDSHAKE_TIMEOUT)
    except asyncio.TimeoutError:
        raise SandboxError(f"the sandbox did not start within {HANDSHAKE_TIMEOUT:.0f} s",
                           step="handshake") from None
    except SandboxError as e:
        if e.grandchild_pid and not hs.grandchild_pid:
            hs.grandchild_pid = e.grandchild_pid  # our unreaped child: its pid is stable
        if e.stage is None:  # no record: how the stage ended says more
            ended = await _stage_end(hs)
            if ended and "killed by" in ended:
                raise SandboxError(f"the sandbox {ended}", step=e.step) from None
            if ended:
                raise SandboxError(f"{e}; the sandbox {ended}", step=e.step) from None
        raise


async def _stage_end(hs: Handshake) -> str | None:
    """How a stage that ended without a record ended: "child was killed by
    SIGSEGV", "grandchild exited with status 1"; None when none has."""
    for who, pid, pidfd in (("child", hs.child_pid, hs.child_pidfd),
                            ("grandchild", hs.grandchild_pid, hs.grandchild_pidfd)):
        if pidfd < 0 or not _exiting(pid):
            continue
        try:
            # an exit under load can take a while: the caller fails anyway
            await asyncio.wait_for(readable(pidfd), 5.0)
        except asyncio.TimeoutError:
            return f"{who} did not finish exiting within 5 s"
        died = os.waitid(os.P_PIDFD, pidfd,  # noqa: ASYNC222 - it has exited
                         os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if died is None:
            continue
        if died.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return f"{who} was killed by {signal.Signals(died.si_status).name}"
        return f"{who} exited with status {died.si_status}"
    return None


async def _drive(
    hs: Handshake,
    child: SyncChannel,
    grandchild: SyncChannel,
    write_maps: Callable[[int], Awaitable[None]],
    attach_cgroup: Callable[[int], None],
    fault_step: int,
) -> None:
    await child.expect(lib.NSX_SYNC_USERMAP_PLS, "unshare_user")
    try:
        userns = os.stat(f"/proc/{hs.child_pid}/ns/user")
        hs.child_userns = (userns.st_dev, userns.st_ino)
    except OSError:
        child.raise_pending_error()
        raise
    _fault(fault_step, "write_id_maps")
    try:
        await write_maps(hs.child_pid)
    except SandboxError:
        child.raise_pending_error()
        raise
    # Without CLONE_INTO_CGROUP the Child joins the cgroup now, before it
    # can create anything that would escape it.
    _fault(fault_step, "cgroup_attach")
    attach_cgroup(hs.child_pid)
    await child.send(lib.NSX_SYNC_USERMAP_ACK, "wait_usermap_ack")

    msg = await child.expect(lib.NSX_SYNC_RECVPID_PLS, "clone_grandchild")
    hs.grandchild_pid = msg.pids[1]
    _fault(fault_step, "pidfd_open")
    try:
        hs.grandchild_pidfd = os.pidfd_open(hs.grandchild_pid)
    except OSError as e:
        raise SandboxError(f"pidfd_open({hs.grandchild_pid}) of the grandchild failed",
                           step="pidfd_open", errno=e.errno or 0) from None
    await child.send(lib.NSX_SYNC_RECVPID_ACK, "wait_recvpid_ack")
    await child.expect(lib.NSX_SYNC_CHILD_READY, "send_child_ready")

    # The Child is exiting now: the GrandChild starts meanwhile, we reap after.
    await grandchild.send(lib.NSX_SYNC_GRANDCHILD, "wait_grandchild")
    _fault(fault_step, "reap_child")
    status = await _reap(hs.child_pid, hs.child_pidfd)
    os.close(hs.child_pidfd)
    hs.child_pid, hs.child_pidfd = 0, -1
    if status != 0:
        child.raise_pending_error()
        how = (f"was killed by {signal.Signals(-status).name}" if status < 0
               else f"exited with status {status}")
        raise SandboxError(f"the child {how}", step="reap_child")
    await grandchild.expect(lib.NSX_SYNC_CHILD_READY, "wait_grandchild")
    # EOF: the exec (of the command, through the init when there is one)
    # closed the last copy of the close-on-exec socket.
    msg_or_eof = await grandchild.recv("exec")
    if msg_or_eof is not None:
        raise SandboxError(f"unexpected {SYNC_NAMES.get(msg_or_eof.type)} after exec",
                           step="exec")
    # EOF also when the init dies (a crash, the OOM killer) before the
    # command is exec'd: no record then, but a signal in its exit status.
    if _exiting(hs.grandchild_pid):
        await readable(hs.grandchild_pidfd)
        died = os.waitid(os.P_PIDFD, hs.grandchild_pidfd,  # noqa: ASYNC222 - it has exited
                         os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if died is not None and died.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            raise SandboxError(f"the sandbox's init was killed by "
                               f"{signal.Signals(died.si_status).name} as it started the "
                               "command", step="init_setup")


PF_EXITING = 0x4


def _exiting(pid: int) -> bool:
    """Whether `pid` is on its way out. Linux sets PF_EXITING before it closes
    a dying process's fds, so a peer that sees EOF can tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)
