"""uid/gid maps: validation, /etc/subuid ranges, and writing them for a Child.

A single mapping of the caller's own id is written straight into
/proc/<child>/{setgroups,uid_map,gid_map}; anything more needs the setuid
helpers newuidmap/newgidmap (Debian package `uidmap`), which check the maps
against /etc/subuid and /etc/subgid. As root, any map is written directly.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxError

MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"
MAX_RANGES = 340    # the kernel's limit on lines in a map


@dataclass(frozen=True)
class IdRange:
    """`count` ids starting at `inside` in the sandbox map to `outside` on the host."""

    inside: int
    outside: int
    count: int

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}"

    def __str__(self) -> str:
        return f"{self.inside}:{self.outside}:{self.count}"


def parse_range(value: object, kind: str) -> IdRange:
    """An IdRange from "I:O:N", (I, O, N) or [I, O, N]."""
    parts: list[object]
    if isinstance(value, str):
        parts = list(value.split(":"))
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise SandboxError(f"{kind} entry {value!r} must be 'inside:outside:count'")
    if len(parts) != 3:
        raise SandboxError(f"{kind} entry {value!r} must have 3 parts: inside, outside, count")
    try:
        inside, outside, count = (int(str(p)) for p in parts)
    except ValueError:
        raise SandboxError(f"{kind} entry {value!r} must be three integers") from None
    return IdRange(inside, outside, count)


def validate_map(ranges: list[IdRange], kind: str) -> None:
    """Reject what the kernel would reject, naming the bad entry."""
    if not ranges:
        raise SandboxError(f"{kind} is empty: map at least one id")
    if len(ranges) > MAX_RANGES:
        raise SandboxError(f"{kind} has {len(ranges)} entries; the kernel allows {MAX_RANGES}")
    for r in ranges:
        if r.count < 1:
            raise SandboxError(f"{kind} entry {r} maps {r.count} ids: count must be at least 1")
        for side, start in (("inside", r.inside), ("outside", r.outside)):
            if start < 0 or start + r.count - 1 > MAX_ID:
                raise SandboxError(
                    f"{kind} entry {r}: {side} ids must lie within 0..{MAX_ID}"
                )
    for side in ("inside", "outside"):
        spans = sorted((getattr(r, side), r) for r in ranges)
        for (start_a, a), (start_b, b) in itertools.pairwise(spans):
            if start_a + a.count > start_b:
                raise SandboxError(f"{kind} entries {a} and {b} overlap on the {side} side")


def map_inside(ranges: list[IdRange], outside: int) -> int | None:
    """The id inside that `outside` maps to, if any."""
    for r in ranges:
        if r.outside <= outside < r.outside + r.count:
            return r.inside + outside - r.outside
    return None


def is_mapped_inside(ranges: list[IdRange], inside: int) -> bool:
    return any(r.inside <= inside < r.inside + r.count for r in ranges)


def needs_helper(ranges: list[IdRange], own_id: int) -> bool:
    """Whether this map must go through newuidmap/newgidmap for this caller."""
    if os.geteuid() == 0:
        return False
    return not (len(ranges) == 1 and ranges[0].count == 1 and ranges[0].outside == own_id)


def subordinate_ranges(path: Path, uid: int) -> list[tuple[int, int]]:
    """The caller's (start, count) ranges in /etc/subuid or /etc/subgid."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)):
            try:
                found.append((int(fields[1]), int(fields[2])))
            except ValueError:
                continue
    return found


def check_helper_map(ranges: list[IdRange], kind: str, own_id: int) -> None:
    """Before any clone: the helper exists and every range is the caller's own."""
    helper = "newuidmap" if kind == "uid_map" else "newgidmap"
    if shutil.which(helper) is None:
        raise SandboxError(
            f"{kind} {' '.join(map(str, ranges))} has more than your own id and needs "
            f"{helper}, which is not installed",
            hint="install it with `apt-get install uidmap` (Fedora: shadow-utils), or map "
            "only your own id",
        )
    path = Path("/etc/subuid" if kind == "uid_map" else "/etc/subgid")
    allowed = subordinate_ranges(path, os.getuid())
    for r in ranges:
        if r.count == 1 and r.outside == own_id:
            continue
        if not any(start <= r.outside and r.outside + r.count <= start + count
                   for start, count in allowed):
            have = ", ".join(f"{s}-{s + c - 1}" for s, c in allowed) or "none"
            raise SandboxError(
                f"{kind} entry {r} maps outside ids {r.outside}-{r.outside + r.count - 1}, "
                f"which are not yours in {path} (yours: {have})",
                hint=f"add a range with `usermod --add-sub{kind[:3]}s START-END {_user_name()}`"
                " or change the map",
            )


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


async def _run_helper(helper: str, pid: int, ranges: list[IdRange]) -> None:
    args = [str(pid)] + [str(n) for r in ranges for n in (r.inside, r.outside, r.count)]
    path = shutil.which(helper)
    if path is None:
        raise SandboxError(f"{helper} is not installed", step="write_id_maps",
                           hint="install it with `apt-get install uidmap`")
    proc = await asyncio.create_subprocess_exec(
        path, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise SandboxError(
            f"{helper} {' '.join(args)} failed (exit {proc.returncode}): "
            f"{err.decode(errors='replace').strip()}",
            step="write_id_maps",
            hint=f"{helper} must be setuid root or have file capabilities, and the ranges must "
            "be yours in /etc/subuid and /etc/subgid",
        )


def _write_proc(pid: int, name: str, text: str) -> None:
    path = f"/proc/{pid}/{name}"
    try:
        # os.open, not open(): the io stack costs more than the write itself,
        # and this is on every kernel's start path.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise SandboxError(f"writing {text.strip()!r} to {path} failed", step="write_id_maps",
                           errno=e.errno or 0) from None


async def write_id_maps(pid: int, uid_map: list[IdRange], gid_map: list[IdRange],
                        deny_setgroups: bool) -> None:
    """Give the Child (already in its new user namespace) its uid and gid maps."""
    if deny_setgroups:
        # An unprivileged gid_map write is allowed only with setgroups denied.
        _write_proc(pid, "setgroups", "deny")
    if needs_helper(uid_map, os.geteuid()):
        await _run_helper("newuidmap", pid, uid_map)
    else:
        _write_proc(pid, "uid_map", "".join(r.line() + "\n" for r in uid_map))
    if needs_helper(gid_map, os.getegid()):
        await _run_helper("newgidmap", pid, gid_map)
    else:
        _write_proc(pid, "gid_map", "".join(r.line() + "\n" for r in gid_map))
