"""A cgroup per sandbox (placeholder until the resource-limits issue lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sandbox import SandboxSpec


class SandboxCgroup:
    """The cgroup(s) of one sandbox."""

    clone_fd: int = -1  # a cgroup v2 directory fd for CLONE_INTO_CGROUP, or -1

    def attach(self, pid: int, *, placed_by_clone: bool) -> None:
        """Move the Child into the cgroup (the parts clone3 did not do)."""

    def kill_and_remove(self) -> None:
        """Kill everything left inside and remove the cgroup; idempotent."""


def create_cgroup(spec: SandboxSpec, name: str | None) -> SandboxCgroup | None:
    return None
