"""SandboxSpec: the validated description of one sandbox.

Everything a user can get wrong is checked here, before anything is cloned,
and every error names the bad value. The C stages receive only what this
module (and the planners it calls) decided.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .egress import DEFAULT_EGRESS_DENY, parse_deny
from .errors import SandboxError
from .idmap import IdRange, is_mapped_inside, map_inside, parse_range, validate_map

# The namespaces a sandbox may have; user, pid and mount are what make it a
# sandbox at all, so they can't be left out.
NAMESPACES = ("user", "pid", "mount", "ipc", "uts", "cgroup", "net")
REQUIRED_NAMESPACES = frozenset({"user", "pid", "mount"})
DEFAULT_NAMESPACES = ("user", "pid", "mount", "ipc", "uts", "cgroup")
USERS = ("self", "root")
NETWORKS = ("host", "none", "egress")
SECCOMP_MODES = ("default", "off")
GPU_CHOICES = ("none", "all")
DEFAULT_READWRITE = ("~", "{cwd}")
MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
DEFAULT_STATE_DIR = "~/.local/share/nsprovisioner/sandbox"
# The sandbox's share of its user's per-user counters (/proc/sys/user/*),
# written in its own user namespace. Inotify: a kernel can't use up the
# instances its user's server and other kernels need (the host's default is
# 128 per user). Namespaces: none can be made inside (seccomp refuses them
# too; this holds with seccomp off).
DEFAULT_USER_COUNTERS = {
    "max_inotify_instances": 32, "max_inotify_watches": 16384,
    "max_user_namespaces": 0, "max_mnt_namespaces": 0, "max_pid_namespaces": 0,
    "max_net_namespaces": 0, "max_ipc_namespaces": 0, "max_uts_namespaces": 0,
    "max_cgroup_namespaces": 0, "max_time_namespaces": 0,
}
USER_COUNTER_NAMES = (*DEFAULT_USER_COUNTERS, "max_fanotify_groups", "max_fanotify_marks")
DEFAULT_NPROC_LIMIT = 4096
DEFAULT_TMP_SIZE = "10%"


def _as_tuple(value: object, key: str) -> tuple[object, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SandboxError(f"{key} must be a list, not {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SandboxSpec:
    """What a sandbox looks like. Invalid values raise SandboxError at once."""

    user: str = "self"
    uid_map: Sequence[object] | None = None
    gid_map: Sequence[object] | None = None
    namespaces: Sequence[str] = DEFAULT_NAMESPACES
    init: bool = True
    network: str = "host"
    hostname: str | None = "sandbox"
    # network = "egress": ranges the sandbox can't reach (egress.py adds the
    # host's own addresses, loopback, link-local and multicast to them)
    egress_deny: Sequence[str] = DEFAULT_EGRESS_DENY
    # the filesystem and privilege boundary (mounts.py, seccomp.py)
    readonly_root: bool = True
    readwrite_paths: Sequence[str] = DEFAULT_READWRITE
    readonly_paths: Sequence[str] = ()
    hidden_paths: Sequence[str] = ()
    private_tmp: bool = True
    private_run: bool = True
    tmp_size: str | int = DEFAULT_TMP_SIZE
    # host device nodes bound into the sandbox's /dev (devices.py)
    devices: Sequence[str] = ()
    gpus: str | Sequence[int] = "none"
    # what a kernel may not change for anything outside (protect.py)
    protect_home: bool = True
    protected_paths: Sequence[str] = ()
    writable_dotfiles: Sequence[str] = ()
    state_dir: str | None = DEFAULT_STATE_DIR
    seccomp: str = "default"
    # resource limits (cgroups.py)
    memory_limit: str | int | None = None
    cpu_limit: float | None = None
    pids_limit: int | None = None
    cgroup_parent: str = "auto"
    nproc_limit: int | None = DEFAULT_NPROC_LIMIT
    user_counters: Mapping[str, int] = field(
        default_factory=lambda: dict(DEFAULT_USER_COUNTERS))
    # what to do when the host can't enforce a setting: fail (True) or warn
    strict: bool = True

    # derived in __post_init__
    uid_ranges: tuple[IdRange, ...] = field(init=False, repr=False)
    gid_ranges: tuple[IdRange, ...] = field(init=False, repr=False)
    uid: int = field(init=False, repr=False)
    gid: int = field(init=False, repr=False)
    memory_bytes: int | None = field(init=False, repr=False)
    tmpfs_size: str = field(init=False, repr=False)  # tmpfs's size= option

    def __post_init__(self) -> None:
        if self.user not in USERS:
            raise SandboxError(f"user {self.user!r} is not one of {', '.join(USERS)}")
        for key in ("init", "readonly_root", "private_tmp", "private_run", "protect_home",
                    "strict"):
            if not isinstance(getattr(self, key), bool):
                raise SandboxError(f"{key} must be true or false, not {getattr(self, key)!r}")
        if self.seccomp not in SECCOMP_MODES:
            raise SandboxError(f"seccomp {self.seccomp!r} is not one of {', '.join(SECCOMP_MODES)}")
        for key in ("readwrite_paths", "readonly_paths", "hidden_paths", "protected_paths"):
            paths = _as_tuple(getattr(self, key), key)
            for path in paths:
                if not isinstance(path, str) or not path or "\0" in path:
                    raise SandboxError(f"{key} entry {path!r} must be a non-empty path")
            object.__setattr__(self, key, paths)
        object.__setattr__(self, "devices", _check_devices(self.devices))
        object.__setattr__(self, "gpus", parse_gpus(self.gpus))
        object.__setattr__(self, "memory_bytes", parse_memory(self.memory_limit))
        object.__setattr__(self, "tmpfs_size", parse_tmp_size(self.tmp_size))
        self._check_state()
        self._check_limits()
        if self.network not in NETWORKS:
            raise SandboxError(f"network {self.network!r} is not one of {', '.join(NETWORKS)}")
        self._check_namespaces()
        object.__setattr__(self, "egress_deny", parse_deny(self.egress_deny))
        if self.hostname is not None:
            _check_hostname(self.hostname)
        uid_ranges = self._ranges(self.uid_map, "uid_map", os.getuid())
        gid_ranges = self._ranges(self.gid_map, "gid_map", os.getgid())
        object.__setattr__(self, "uid_ranges", uid_ranges)
        object.__setattr__(self, "gid_ranges", gid_ranges)
        object.__setattr__(self, "uid", self._identity(uid_ranges, "uid_map", os.getuid()))
        object.__setattr__(self, "gid", self._identity(gid_ranges, "gid_map", os.getgid()))

    def _check_state(self) -> None:
        names = _as_tuple(self.writable_dotfiles, "writable_dotfiles")
        for name in names:
            if (not isinstance(name, str) or not name.startswith(".") or "/" in name
                    or name in (".", "..")):
                raise SandboxError(f"writable_dotfiles entry {name!r} must be the name of a "
                                   "top-level dot entry of home, e.g. '.cache'")
        object.__setattr__(self, "writable_dotfiles", names)
        if self.state_dir is not None and (
                not isinstance(self.state_dir, str) or "\0" in self.state_dir
                or not (self.state_dir.startswith("/") or self.state_dir.startswith("~"))):
            raise SandboxError(f"state_dir {self.state_dir!r} must be an absolute path, a "
                               "path starting with ~, or null (no sandbox state)")
        if not isinstance(self.user_counters, Mapping):
            raise SandboxError(f"user_counters {self.user_counters!r} must be a mapping of "
                               "/proc/sys/user names to numbers")
        for name, value in self.user_counters.items():
            if name not in USER_COUNTER_NAMES:
                raise SandboxError(f"user_counters: unknown counter {name!r}; known: "
                                   f"{', '.join(USER_COUNTER_NAMES)}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SandboxError(f"user_counters {name!r} = {value!r} must be an integer "
                                   ">= 0")
        object.__setattr__(self, "user_counters", dict(self.user_counters))

    def _check_limits(self) -> None:
        if self.cpu_limit is not None:
            if isinstance(self.cpu_limit, bool) or not isinstance(self.cpu_limit, (int, float)):
                raise SandboxError(f"cpu_limit {self.cpu_limit!r} must be a number of cores")
            if not 0.01 <= self.cpu_limit <= 4096:
                raise SandboxError(f"cpu_limit {self.cpu_limit!r} must be between 0.01 and 4096 "
                                   "cores")
        for key in ("pids_limit", "nproc_limit"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise SandboxError(f"{key} {value!r} must be an integer")
            if value < 1:
                raise SandboxError(f"{key} {value!r} must be at least 1")
        if not isinstance(self.cgroup_parent, str) or not self.cgroup_parent or (
                self.cgroup_parent != "auto" and not self.cgroup_parent.startswith("/")):
            raise SandboxError(f"cgroup_parent {self.cgroup_parent!r} must be 'auto' or an "
                               "absolute cgroup path")

    @property
    def has_limits(self) -> bool:
        return (self.memory_bytes is not None or self.cpu_limit is not None
                or self.pids_limit is not None)

    def _check_namespaces(self) -> None:
        names = _as_tuple(self.namespaces, "namespaces")
        for name in names:
            if name not in NAMESPACES:
                raise SandboxError(
                    f"namespaces: unknown namespace {name!r}; known: {', '.join(NAMESPACES)}"
                )
        missing = REQUIRED_NAMESPACES - set(names)
        if missing:
            raise SandboxError(f"namespaces must include {', '.join(sorted(missing))}")
        if self.network in ("none", "egress") and "net" not in names:
            object.__setattr__(self, "namespaces", (*names, "net"))
        elif self.network == "host" and "net" in names:
            raise SandboxError("namespaces includes 'net' but network is 'host'; "
                               "use network = 'none' or 'egress' for a private network")
        else:
            object.__setattr__(self, "namespaces", tuple(str(n) for n in names))

    def _ranges(self, value: Sequence[object] | None, kind: str, own: int) -> tuple[IdRange, ...]:
        if value is None:
            inside = 0 if self.user == "root" else own
            return (IdRange(inside, own, 1),)
        ranges = [parse_range(v, kind) for v in _as_tuple(value, kind)]
        validate_map(ranges, kind)
        return tuple(ranges)

    def _identity(self, ranges: tuple[IdRange, ...], kind: str, own: int) -> int:
        """The id the command runs as inside."""
        if self.user == "root":
            if not is_mapped_inside(list(ranges), 0):
                raise SandboxError(f"user 'root' needs id 0 inside, but {kind} does not map it")
            return 0
        inside = map_inside(list(ranges), own)
        if inside is None:
            raise SandboxError(
                f"user 'self' runs as your own id {own}, but {kind} does not map it; "
                "add it to the map or use user 'root'"
            )
        return inside


def _check_devices(value: object) -> tuple[str, ...]:
    entries = _as_tuple(value, "devices")
    for entry in entries:
        if (not isinstance(entry, str) or not entry.startswith("/dev/") or "\0" in entry
                or any(part in ("", ".", "..") for part in entry[len("/dev/"):].split("/"))):
            raise SandboxError(f"devices entry {entry!r} must be a path or glob under /dev, "
                               "e.g. /dev/fuse or /dev/dri/renderD*")
    return tuple(str(e) for e in entries)


def parse_gpus(value: object) -> str | tuple[int, ...]:
    """"none", "all", or GPU indices (a list, or "0,1" as on the command line)."""
    if value in GPU_CHOICES:
        return str(value)
    indices: list[object] = []
    if isinstance(value, str):
        indices = [int(p) if p.strip().isdigit() else p for p in value.split(",")]
    elif isinstance(value, Iterable) and not isinstance(value, bytes):
        indices = list(value)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                          for i in indices):
        raise SandboxError(f"gpus must be 'none', 'all' or a list of GPU indices such as "
                           f"[0, 1] (\"0,1\"), not {value!r}")
    if len(set(indices)) != len(indices):
        raise SandboxError(f"gpus lists an index twice: {value!r}")
    return tuple(sorted(int(str(i)) for i in indices))


def parse_memory(value: object) -> int | None:
    """Bytes from "512M", "2G", "1.5G" or an integer; None for no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise SandboxError(f"memory_limit {value!r} must be a size such as 512M or 2G")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in MEMORY_UNITS and text[-1:] else ""
        number = text[:-1] if unit else text
        try:
            size = int(float(number) * MEMORY_UNITS[unit])
        except ValueError:
            raise SandboxError(f"memory_limit {value!r} is not a size: use bytes or a number "
                               "with K, M, G or T, e.g. 512M") from None
    else:
        raise SandboxError(f"memory_limit {value!r} must be a size such as 512M or 2G")
    if size <= 0:
        raise SandboxError(f"memory_limit {value!r} must be positive, e.g. 512M")
    if size < 1024 * 1024:
        raise SandboxError(f"memory_limit {value!r} is below 1 MiB; a kernel needs far more")
    return size


def parse_tmp_size(value: object) -> str:
    """tmpfs's size= for the private /tmp, /var/tmp, /dev/shm: "10%" of RAM, or a size."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1]
        if number.isdigit() and 1 <= int(number) <= 100:
            return f"{int(number)}%"
        raise SandboxError(f"tmp_size {value!r} must be a percentage of RAM from 1% to 100%, "
                           "or a size such as 512M")
    try:
        size = parse_memory(value)
    except SandboxError as e:
        raise SandboxError(str(e).replace("memory_limit", "tmp_size")) from None
    if size is None:
        raise SandboxError("tmp_size must be a percentage of RAM (e.g. 10%) or a size "
                           "(e.g. 1G)")
    return str(size)


def _check_hostname(name: str) -> None:
    if not 0 < len(name) <= 64 or not all(c.isalnum() or c in "-." for c in name):
        raise SandboxError(f"hostname {name!r} must be 1-64 letters, digits, '-' or '.'")


def check_argv(argv: Sequence[str]) -> list[str]:
    """The command line, rejected when empty or when it can't be passed to exec."""
    if isinstance(argv, (str, bytes)):
        raise SandboxError(f"argv must be a list of strings, not the string {argv!r}")
    args = list(argv)
    if not args:
        raise SandboxError("argv is empty: give the command to run")
    for arg in args:
        if not isinstance(arg, str):
            raise SandboxError(f"argv entry {arg!r} is not a string")
        if "\0" in arg:
            raise SandboxError(f"argv entry {arg!r} contains a NUL byte")
    return args


def check_env(env: dict[str, str]) -> list[str]:
    """The environment as NAME=value strings, rejected where exec would mangle it."""
    out = []
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"environment variable {key!r}={value!r} is invalid")
        out.append(f"{key}={value}")
    return out
