"""Where the cgroup hierarchies are mounted, where the caller sits in them,
and the few file operations cgroupfs needs.

Everything that touches cgroupfs goes through a CgroupHost, so the tests can
point one at a fake tree in a temporary directory (a supplement to the tests
on the real hierarchies, never a replacement).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from dataclasses import dataclass, field

# The v1 controllers a sandbox may get a directory in: the three that carry
# limits, cpuacct for CPU time, freezer for a race-free kill.
V1_CONTROLLERS = frozenset({"memory", "pids", "cpu", "cpuacct", "freezer"})


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and the caller's cgroup in it.

    `controllers` is, for v1, the set bound to the hierarchy; for v2, the
    root's cgroup.controllers (what any cgroup below could get at most).
    `own_path` is the caller's cgroup as /proc/self/cgroup names it, or None
    when the mount does not show it (mounted from another cgroup namespace).
    """

    version: int
    mount: str
    controllers: frozenset[str]
    own_path: str | None
    mount_root: str = "/"

    def directory(self, cgroup_path: str) -> str | None:
        """The directory of `cgroup_path` (as /proc/<pid>/cgroup names it), or None."""
        root = self.mount_root.rstrip("/")
        if cgroup_path != root and not cgroup_path.startswith(root + "/"):
            return None
        rest = cgroup_path[len(root):].strip("/")
        return os.path.join(self.mount, rest) if rest else self.mount

    def cgroup_path(self, directory: str) -> str:
        """The inverse of directory(): /proc-style path of a directory in this mount."""
        rest = os.path.relpath(directory, self.mount)
        rest = "" if rest == "." else rest
        return "/" + os.path.join(self.mount_root.strip("/"), rest).strip("/")

    @property
    def label(self) -> str:
        return "cgroup2" if self.version == 2 else ",".join(sorted(self.controllers))


@dataclass
class CgroupHost:
    """The cgroup hierarchies of this host as the caller sees them.

    The file operations are methods so that a fake cgroupfs can give a tmp
    tree the kernel's behaviour (interface files in new directories, EBUSY
    from the no-internal-processes rule, ...).
    """

    v2: Hierarchy | None = None
    v1: list[Hierarchy] = field(default_factory=list)

    @classmethod
    def detect(cls, proc: str = "/proc/self") -> CgroupHost:
        """Read /proc/self/mountinfo and /proc/self/cgroup."""
        try:
            own = _read_text(os.path.join(proc, "cgroup"))
        except OSError:
            return cls()
        return cls._parse(own, _read_text(os.path.join(proc, "mountinfo")))

    @classmethod
    def _parse(cls, own: str, mountinfo: str) -> CgroupHost:
        """The host from the texts of /proc/self/cgroup and /proc/self/mountinfo."""
        own_v1: dict[frozenset[str], str] = {}
        own_v2: str | None = None
        for line in _lines(own):
            _, names, path = line.split(":", 2)
            if names == "":
                own_v2 = path
            else:
                own_v1[frozenset(names.split(","))] = path
        host = cls()
        seen: set[frozenset[str]] = set()
        for line in _lines(mountinfo):
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3]
            root, mount = _unescape(fields[3]), _unescape(fields[4])
            if fstype == "cgroup2" and host.v2 is None:
                host.v2 = Hierarchy(2, mount, _v2_controllers(mount), own_v2, root)
            elif fstype == "cgroup":
                # /proc/self/cgroup names each hierarchy by its controllers;
                # the super options hold them among flags like xattr.
                opts = set(options.split(","))
                bound = next((n for n in own_v1 if n <= opts), None)
                if bound and bound & V1_CONTROLLERS and bound not in seen:
                    seen.add(bound)
                    host.v1.append(Hierarchy(1, mount, bound, own_v1[bound], root))
        return host

    def v1_for(self, controller: str) -> Hierarchy | None:
        for hierarchy in self.v1:
            if controller in hierarchy.controllers:
                return hierarchy
        return None

    # ---- file operations (overridden by the tests' fake cgroupfs) ----

    def read(self, path: str) -> str:
        return _read_text(path)

    def write(self, path: str, text: str) -> None:
        """Write an interface file. Never creates one: cgroupfs files exist or are absent."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def make_dir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def remove_dir(self, path: str) -> None:
        os.rmdir(path)

    def list_dirs(self, path: str) -> list[str]:
        try:
            return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []


class _DetectCache:
    """detect()'s answer for this process, reused until something it depends on changes.

    What is re-read, and why that suffices:
    - /proc/self/cgroup, on every call: the server's own cgroup moves (into its
      leaf, by an admin, by systemd), and a sandbox placed under a stale one
      could escape the limits of the cgroup the server now sits in.
    - /proc/self/mountinfo, only when poll() on an fd of it reports an event:
      the kernel raises one on every mount, umount, move and remount in the
      mount namespace the fd was opened in. A new mount namespace (unshare,
      setns), a fork (another process's fd) or an fd someone else closed or
      reused also mean a fresh read.
    - The v2 root's cgroup.controllers is read along with mountinfo. It can
      change without a mount event (a detached v1 hierarchy releases its
      controllers only once its last cgroup is gone), which is why
      create_cgroup() uses this only for sandboxes without limits: their
      cgroup never depends on which controllers the root offers.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = -1
        self.fd = -1
        self.fd_id = (0, 0)
        self.mount_ns = 0
        self.poll = select.poll()
        self.own = ""
        self.mountinfo = ""
        self.host: CgroupHost | None = None

    def current(self) -> CgroupHost:
        try:
            own = _read_text("/proc/self/cgroup")
        except OSError:
            return CgroupHost()  # as detect()
        with self.lock:
            if self.host is None or self._mounts_changed():
                self._read_mounts()
                self.host = None
            if self.host is None or own != self.own:
                self.own = own
                self.host = CgroupHost._parse(own, self.mountinfo)
            # a new CgroupHost: callers may replace its fields; the Hierarchy
            # objects are frozen and shared
            return CgroupHost(self.host.v2, list(self.host.v1))

    def _mounts_changed(self) -> bool:
        if self.pid != os.getpid() or not self._still_ours():
            return True
        try:
            if os.stat("/proc/self/ns/mnt").st_ino != self.mount_ns:
                return True
        except OSError:
            return True
        return bool(self.poll.poll(0))  # POLLPRI|POLLERR: the table changed

    def _still_ours(self) -> bool:
        """Whether self.fd is still the mountinfo fd we opened (not closed and reused)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.fd_id

    def _read_mounts(self) -> None:
        if self.fd >= 0:
            self.poll.unregister(self.fd)
            if self._still_ours():
                os.close(self.fd)  # (after a fork: this process's copy of it)
            self.fd = -1
        # The fd is opened before the read: a change after the open is
        # reported by the next poll, at worst as one needless re-read.
        mount_ns = os.stat("/proc/self/ns/mnt").st_ino
        fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.mountinfo = _read_fd(fd)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.fd_id, self.mount_ns, self.pid = fd, (st.st_dev, st.st_ino), mount_ns, \
            os.getpid()
        self.poll.register(fd, select.POLLPRI | select.POLLERR)


_detect_cache = _DetectCache()


def current_host() -> CgroupHost:
    """CgroupHost.detect() at a fraction of its cost; see _DetectCache for what may be stale."""
    return _detect_cache.current()


def _read_text(path: str) -> str:
    """A whole file, read without Python's io stack (which costs more than the read
    itself for a cgroupfs or /proc file, and spawn reads several)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    # surrogateescape, as os does for paths: a mount point or a process name
    # that is not UTF-8 must not make the whole file unreadable
    return b"".join(chunks).decode(errors="surrogateescape")


def _lines(text: str) -> list[str]:
    """The lines of a /proc file, which the kernel ends with "\\n" and nothing else
    (str.splitlines would also split inside a cgroup's name at \\x1c or \\x85)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _v2_controllers(mount: str) -> frozenset[str]:
    try:
        return frozenset(_read_text(os.path.join(mount, "cgroup.controllers")).split())
    except OSError:
        return frozenset()


def read_keyed(host: CgroupHost, path: str) -> dict[str, int]:
    """A flat-keyed file ("key value" lines: memory.events, cpu.stat, ...)."""
    return parse_keyed(host.read(path))


def parse_keyed(text: str) -> dict[str, int]:
    """The integer values of a flat-keyed file's text."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def read_pids(host: CgroupHost, directory: str) -> list[int]:
    try:
        return [int(p) for p in host.read(os.path.join(directory, "cgroup.procs")).split()]
    except OSError as e:
        if e.errno == errno.ENOENT:
            return []
        raise


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): tells a pid's reuse apart."""
    try:
        stat = _read_text(f"/proc/{pid}/stat")
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def pid_namespace_id() -> int:
    return os.stat("/proc/self/ns/pid").st_ino
