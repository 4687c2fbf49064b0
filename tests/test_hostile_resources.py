"""A hostile notebook can't exhaust what its user's server and other kernels need (issue 11, 8).

With no limit configured, a kernel must still be bounded in processes, in the
size of its private tmpfs mounts, and in per-user kernel counters such as
inotify instances, so that the server's user can go on forking and watching
files. Each attack is bounded itself, so that a failing run leaves the
machine usable: the fork bomb stops at HARD_STOP processes, which all go when
the kernel is shut down.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PROBE_HELPERS
from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(90)

# Half again the cap a kernel should get by default (4096 processes): a kernel
# that gets here has no cap worth the name. Not more: a host's pid_max may be
# 32768, and forks slow down as the process table fills (8192 take 10 s).
HARD_STOP = 6000

# Run by a bare interpreter (a forked ipykernel is slow to copy): forks stopped
# children until fork fails or HARD_STOP, says how far it got, and holds them
# until told to let go.
FORK_BOMB = """
import errno, json, os, signal, sys
children, stopped_by = [], None
while len(children) < int(sys.argv[1]):
    try:
        pid = os.fork()
    except OSError as e:
        stopped_by = errno.errorcode[e.errno]
        break
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    children.append(pid)
print(json.dumps({"count": len(children), "stopped_by": stopped_by}), flush=True)
sys.stdin.readline()
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
"""

START_BOMB = """
import subprocess, sys
bomb = subprocess.Popen([sys.executable, "-S", "-c", FORK_BOMB, str(HARD_STOP)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print(bomb.stdout.readline())
"""

REAP = "bomb.communicate('go\\n', timeout=50)\nprint(bomb.returncode)\n"


def test_fork_bomb_is_capped_and_the_host_user_can_still_fork(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        bomb = json.loads(server.execute(
            kernel, f"HARD_STOP, FORK_BOMB = {HARD_STOP}, {FORK_BOMB!r}\n" + START_BOMB,
            timeout=60))
        # while the kernel's processes live: the server's user still forks
        forked = subprocess.run(["true"], check=False).returncode
        server.execute(kernel, REAP, timeout=60)
    assert forked == 0
    assert bomb["count"] < HARD_STOP and bomb["stopped_by"] == "EAGAIN", (
        f"a kernel with no limits configured started {bomb['count']} processes")


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


TMPFS = PROBE_HELPERS + """
sizes = {}
for path in ("/tmp", "/var/tmp", "/dev/shm"):
    st = os.statvfs(path)
    size = st.f_blocks * st.f_frsize
    past_the_cap = "not tried: no cap"
    if size < CAPPED:
        # tmpfs refuses an allocation larger than its size at once, before
        # taking any memory
        fd = os.open(os.path.join(path, "past-the-cap"), os.O_CREAT | os.O_WRONLY)
        try:
            past_the_cap = err(os.posix_fallocate, fd, 0, size + 2**20)
        finally:
            os.close(fd)
            os.unlink(os.path.join(path, "past-the-cap"))
    sizes[path] = [size, past_the_cap]
print(json.dumps(sizes))
"""


def test_private_tmpfs_mounts_are_size_capped(tmp_path: Path) -> None:
    """/tmp, /var/tmp and /dev/shm are tmpfs mounts charged to no limit: each may take
    half of RAM by tmpfs's default, three times over."""
    host = make_host(tmp_path)
    capped = int(mem_total() * 0.45)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        sizes = json.loads(server.execute(kernel, f"CAPPED = {capped}\n" + TMPFS))
    for path, (size, past_the_cap) in sizes.items():
        assert size < capped, (f"{path} inside is a tmpfs of {size >> 20} MiB "
                               f"of {mem_total() >> 20} MiB RAM")
        assert past_the_cap == "ENOSPC", f"{path}: writing past {size} bytes: {past_the_cap}"


INOTIFY_FILL = PROBE_HELPERS + """
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
instances, stopped_by = [], None
while len(instances) < HARD_STOP:
    fd = libc.inotify_init1(0o2000000)  # IN_CLOEXEC
    if fd < 0:
        stopped_by = errno.errorcode[ctypes.get_errno()]
        break
    instances.append(fd)
print(json.dumps({"count": len(instances), "stopped_by": stopped_by}))
"""

INOTIFY_RELEASE = "for fd in instances:\n    os.close(fd)\nprint(len(instances))\n"


def inotify_init() -> str | None:
    """An inotify instance for this process (closed at once); None, or the errno's name."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0o2000000)
    if fd < 0:
        return os.strerror(ctypes.get_errno())
    os.close(fd)
    return None


def test_kernel_cannot_exhaust_the_users_inotify_instances(tmp_path: Path) -> None:
    assert inotify_init() is None
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        filled = json.loads(server.execute(kernel, "HARD_STOP = 4096\n" + INOTIFY_FILL))
        outside = inotify_init()  # while the kernel holds every instance it could get
        server.execute(kernel, INOTIFY_RELEASE)
    assert outside is None, (f"the server's user can't watch files while a kernel holds "
                             f"{filled['count']} inotify instances: {outside}")
    assert filled["stopped_by"] is not None
