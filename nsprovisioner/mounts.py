"""The GrandChild's mount table, planned in Python and run by csrc/nsexec.c."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from ._nsexec import lib

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


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


def plan_mounts(spec: SandboxSpec, cwd: str) -> list[MountOp]:
    """Mounts for a sandbox: nothing propagates to the host; /proc shows only the sandbox."""
    return [
        MountOp(lib.NSX_MNT_MOUNT, "/", mountflags=MS_REC | MS_PRIVATE),
        MountOp(lib.NSX_MNT_MOUNT, "/proc", source="proc", fstype="proc",
                mountflags=MS_NOSUID | MS_NODEV | MS_NOEXEC),
    ]
