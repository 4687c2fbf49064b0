"""The helper program (nsinit) and its sealed memfd copy (the runc CVE-2019-5736 lesson).

One static binary is the seed's Child, its GrandChild and the sandbox's PID 1
(csrc/). The Parent execs it from a memfd sealed against writes, made once
per server process and shared by all its sandboxes: no process inside can
open /proc/1/exe for writing and change what the next sandbox runs. Where
memfd exec is refused (vm.memfd_noexec = 2) the clone falls back to the
installed file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

from .errors import SandboxError

INIT_PATH = Path(__file__).resolve().parent / "nsinit"
MFD_EXEC = 0x10  # Linux 6.3: ask for an executable memfd even under vm.memfd_noexec=1
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

_lock = threading.Lock()
_memfd: int | None = None


def init_path() -> str:
    if not os.access(INIT_PATH, os.X_OK):
        raise SandboxError(
            f"the sandbox helper {INIT_PATH} is missing or not executable",
            hint="reinstall nsprovisioner (`pip install --force-reinstall nsprovisioner`) "
            "with a C compiler available",
        )
    return str(INIT_PATH)


def _make_sealed_copy(path: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create("nsinit", flags | MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:  # before Linux 6.3
            raise
        fd = os.memfd_create("nsinit", flags)
    try:
        with open(path, "rb") as src:
            data = src.read()
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd
    except BaseException:
        os.close(fd)
        raise


def init_memfd() -> int:
    """A sealed memfd holding the helper, made once per process; -1 when unavailable."""
    global _memfd
    with _lock:
        if _memfd is None:
            try:
                _memfd = _make_sealed_copy(init_path())
            except OSError:
                _memfd = -1
        return _memfd


def helper_command() -> tuple[int, str, list[str]]:
    """How the Parent execs the helper: (memfd or -1, file path, argv before the options)."""
    return init_memfd(), init_path(), ["nsinit"]
