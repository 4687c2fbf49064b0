"""A hostile notebook can't stop its init, nor reach io_uring (issue 11, attacks 7, 10).

PID 1 of the sandbox forwards interrupts to the kernel: a kernel that can
ptrace-stop it makes every later interrupt silently fail. io_uring is kernel
attack surface that Docker's default profile, ChromeOS and Android deny.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import INTERRUPTIBLE, PROBE_HELPERS
from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(60)

STOP_INIT = PROBE_HELPERS + """
import ctypes, signal, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long

def ptrace(request):
    if libc.ptrace(request, 1, None, None) == -1:
        return errno.errorcode[ctypes.get_errno()]
    return None

PTRACE_ATTACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 16, 0x4206, 0x4207
done = {"seize": ptrace(PTRACE_SEIZE)}
if done["seize"] is None:
    done["interrupt"] = ptrace(PTRACE_INTERRUPT)  # stops the init, as ATTACH would
else:
    done["attach"] = ptrace(PTRACE_ATTACH)
done["sigstop"] = err(os.kill, 1, signal.SIGSTOP)
time.sleep(0.3)
done["init_state"] = read("/proc/1/stat").rpartition(")")[2].split()[0]
print(json.dumps(done))
"""


def test_kernel_cannot_stop_its_init_and_interrupts_keep_working(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        done = json.loads(server.execute(kernel, STOP_INIT))
        interrupted = server.ok("interrupt_during", id=kernel, marker="sleeping",
                                code=INTERRUPTIBLE)
    assert interrupted["ename"] == "KeyboardInterrupt", (
        f"an interrupt no longer reaches the kernel after {done}: {interrupted}")
    assert done["init_state"] not in ("T", "t"), f"the init is stopped: {done}"
    assert done["seize"] is not None and done.get("attach") is not None, done


IO_URING_SETUP = PROBE_HELPERS + """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
fd = libc.syscall(425, 4, params)  # io_uring_setup: 425 on x86_64, arm64 and the rest
if fd >= 0:
    os.close(fd)
print(json.dumps(None if fd >= 0 else errno.errorcode[ctypes.get_errno()]))
"""


def test_io_uring_is_denied(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        denied = json.loads(server.execute(kernel, IO_URING_SETUP))
    assert denied in ("EPERM", "ENOSYS"), f"io_uring_setup inside: {denied or 'an io_uring'}"
