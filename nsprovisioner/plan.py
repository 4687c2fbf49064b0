"""The plan the Child reads from its socket: struct nsx_plan and its data.

The wire format is declared once, in csrc/nsexec.h (cffi reads the same
text): a struct nsx_plan, then the arrays and strings its offsets point to,
ending in a NUL. The fds it names travel with it (SCM_RIGHTS).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ._nsexec import ffi, lib
from .errors import SandboxError
from .mounts import MountOp

HEADER_SIZE = (ffi.sizeof("struct nsx_plan") + 7) // 8 * 8
MOUNT_SIZE = ffi.sizeof("struct nsx_mount")


class _Data:
    """The data area after the header; offsets count from the plan's start."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes, align: int = 1) -> int:
        pad = -(self.start + self.size) % align
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        offset = self.start + self.size
        self.parts.append(data)
        self.size += len(data)
        return offset

    def string(self, text: str | None) -> int:
        return 0 if text is None else self.add(text.encode() + b"\0")

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _mount_table(plan: tuple[MountOp, ...]) -> bytes:
    """struct nsx_mount[] and its strings, placed right after the header."""
    strings = _Data(HEADER_SIZE + MOUNT_SIZE * len(plan))
    seen: dict[str | None, int] = {None: 0}

    def string(text: str | None) -> int:
        if text not in seen:
            seen[text] = strings.string(text)
        return seen[text]

    array = ffi.new("struct nsx_mount[]", max(len(plan), 1))
    for i, m in enumerate(plan):
        array[i] = {"op": m.op, "flags": m.flags, "source": string(m.source),
                    "target": string(m.target), "fstype": string(m.fstype),
                    "data": string(m.data), "mountflags": m.mountflags,
                    "source_dev": m.source_dev, "source_ino": m.source_ino}
    return bytes(ffi.buffer(array, MOUNT_SIZE * len(plan))) + strings.bytes()


class _MountTables:
    """Mount tables in wire form, built once per plan: a server starts its
    kernels with the same few plans, and building a table was a good part of
    the Python work per start."""

    LIMIT = 32

    def __init__(self) -> None:
        self._tables: dict[tuple[MountOp, ...], bytes] = {}
        self._lock = threading.Lock()  # servers may spawn from several threads' loops

    def get(self, plan: Sequence[MountOp]) -> bytes:
        key = tuple(plan)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                table = _mount_table(key)
                if len(self._tables) >= self.LIMIT:
                    del self._tables[next(iter(self._tables))]
                self._tables[key] = table
            return table


_mount_tables = _MountTables()


@dataclass
class Plan:
    """Everything the helper needs besides argv and the environment."""

    parent_pid: int
    unshare_flags: int
    unshare_cgroup: bool
    loopback_up: bool
    uid: int
    gid: int
    drop_groups: bool
    hostname: str | None
    cwd: str | None
    mounts: Sequence[MountOp]
    fds: Sequence[tuple[int, int]]  # (index among the passed fds, fd number inside)
    sync_target_fd: int
    init: bool
    seccomp_filter: bytes | None
    user_counters: Sequence[tuple[str, str]] = ()  # (/proc/sys/user/<name>, value)
    rlimits: Sequence[tuple[int, int]] = ()  # (resource, soft and hard limit)
    fault_step: int = 0
    fault_kind: int = 0

    def encode(self) -> bytes:
        table = _mount_tables.get(self.mounts)
        data = _Data(HEADER_SIZE)
        data.add(table)
        header = ffi.new("struct nsx_plan *")
        header.mounts = HEADER_SIZE if self.mounts else 0
        header.n_mounts = len(self.mounts)
        if self.fds:
            fdmap = ffi.new("struct nsx_fdmap[]", [{"src": s, "dst": d} for s, d in self.fds])
            header.fds = data.add(bytes(ffi.buffer(fdmap)), align=4)
        header.n_fds = len(self.fds)
        if self.seccomp_filter:
            header.seccomp = data.add(self.seccomp_filter, align=8)
            header.seccomp_len = len(self.seccomp_filter) // 8  # struct sock_filter
        if self.user_counters:
            counters = ffi.new("struct nsx_counter[]", [
                {"path": data.string(path), "value": data.string(value)}
                for path, value in self.user_counters])
            header.user_counters = data.add(bytes(ffi.buffer(counters)), align=4)
        header.n_user_counters = len(self.user_counters)
        if self.rlimits:
            limits = ffi.new("struct nsx_rlimit[]", [
                {"resource": r, "soft": v, "hard": v} for r, v in self.rlimits])
            header.rlimits = data.add(bytes(ffi.buffer(limits)), align=8)
        header.n_rlimits = len(self.rlimits)
        header.hostname = data.string(self.hostname)
        header.cwd = data.string(self.cwd)
        data.add(b"\0")  # the record ends in a NUL
        header.size = HEADER_SIZE + data.size
        header.parent_pid = self.parent_pid
        header.unshare_flags = self.unshare_flags
        header.unshare_cgroup = int(self.unshare_cgroup)
        header.loopback_up = int(self.loopback_up)
        header.uid = self.uid
        header.gid = self.gid
        header.drop_groups = int(self.drop_groups)
        header.sync_target_fd = self.sync_target_fd
        header.init = int(self.init)
        header.fault_step = self.fault_step
        header.fault_kind = self.fault_kind
        head = bytes(ffi.buffer(header))
        encoded: bytes = head + b"\0" * (HEADER_SIZE - len(head)) + data.bytes()
        if len(encoded) > lib.NSX_PLAN_MAX:
            raise SandboxError(f"the sandbox plan takes {len(encoded)} bytes, more than "
                               f"{lib.NSX_PLAN_MAX}",
                               hint="configure fewer readwrite, readonly or hidden paths")
        return encoded
