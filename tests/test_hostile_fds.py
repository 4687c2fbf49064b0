"""A hostile notebook gets no file descriptor of its server (issue 11, attack 3).

The server process here logs to a file or runs in a terminal, as people run
jupyter_server. Inside its kernel, nothing under /proc/1/fd or /proc/self/fd
may be one of the server's files, sockets or its terminal: not readable
(the log holds the token URL), not typable-into, not readable keystrokes.
What the kernel writes to its stdout and stderr still reaches the server's
log, line by line with the kernel's id.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(60)

# Every fd the kernel can reach through /proc, with what it is and what it reads.
PROBE = """
import errno, json, os, stat
seen = {}
for d in ("/proc/1/fd", "/proc/self/fd"):
    try:
        names = os.listdir(d)
    except OSError as e:
        seen[d] = {"error": errno.errorcode[e.errno]}
        continue
    for n in names:
        p = d + "/" + n
        entry = {}
        try:
            entry["target"] = os.readlink(p)
            st = os.stat(p)
            entry["kind"] = stat.S_IFMT(st.st_mode)
            entry["id"] = [st.st_dev, st.st_ino]
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            try:
                entry["tty"] = os.isatty(fd)
                if stat.S_ISREG(st.st_mode) or entry["tty"]:
                    entry["read"] = os.read(fd, 1 << 20).decode(errors="replace")
            finally:
                os.close(fd)
        except OSError as e:
            entry["error"] = errno.errorcode[e.errno]
        seen[p] = entry
print(json.dumps(seen))
"""


def server_fds(pid: int) -> dict[tuple[int, int], str]:
    """The server's files, sockets and terminals by (st_dev, st_ino): what the kernel must not hold.

    Not the anonymous inodes (every eventfd shares one) nor other character
    devices such as /dev/null, which the sandbox binds from the host on purpose.
    """
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            target, st = os.readlink(path), os.stat(path)
        except OSError:
            continue
        is_tty = stat.S_ISCHR(st.st_mode) and ("/pts/" in target or "/tty" in target)
        if stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode) or is_tty:
            found[(st.st_dev, st.st_ino)] = f"server fd {name} -> {target}"
    return found


class Terminal:
    """A pseudo-terminal the server runs in; what it prints is collected into `log`."""

    def __init__(self, log: Path) -> None:
        self.master, self.slave = os.openpty()
        self.log = log
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "ab", buffering=0) as out:
            while True:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: every slave end is closed
                    return
                if not data:
                    return
                out.write(data)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        os.close(self.slave)
        self.reader.join(10)
        os.close(self.master)


@pytest.fixture(params=["logfile", "terminal"])
def stdio(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Terminal | None]:
    if request.param == "logfile":
        yield None
        return
    terminal = Terminal(tmp_path / "server.log")
    try:
        yield terminal
    finally:
        terminal.close()


def test_kernel_holds_no_server_fd(tmp_path: Path, stdio: Terminal | None) -> None:
    host = make_host(tmp_path)
    log = tmp_path / "server.log"
    secret = f"token=SERVER-LOG-SECRET-{uuid.uuid4().hex}"
    typed = f"TYPED-PASSWORD-{uuid.uuid4().hex}"
    if stdio is None:
        log.write_text(f"[I ServerApp] http://127.0.0.1:8888/lab?{secret}\n")
    with ServerProcess(host, log, None if stdio is None else stdio.slave) as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        outside = server_fds(server.proc.pid)
        if stdio is not None:
            stdio.type(typed + "\n")  # waits in the terminal's input for a reader
        seen = json.loads(server.execute(kernel, PROBE))
    read = "".join(e.get("read", "") for e in seen.values())
    assert secret not in read, "the kernel read the server's log"
    assert typed not in read, "the kernel read what was typed into the server's terminal"
    shared = {path: outside[tuple(e["id"])] for path, e in seen.items()
              if "id" in e and tuple(e["id"]) in outside}
    assert not shared, f"the kernel holds the server's fds: {shared}"
    ttys = [path for path, e in seen.items() if e.get("tty")]
    assert not ttys, f"the kernel holds a terminal: {ttys}"


def test_kernel_output_reaches_the_server_log_with_its_id(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    log = tmp_path / "server.log"
    marks = {stream: f"{stream.upper()}-{uuid.uuid4().hex}" for stream in ("stdout", "stderr")}
    with ServerProcess(host, log) as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        # fd-level output, as a C library or a crashing extension writes it
        server.execute(kernel, f"import os; os.system('echo {marks['stdout']}; "
                               f"echo {marks['stderr']} >&2')")
    lines = log.read_text(errors="replace").splitlines()
    for stream, mark in marks.items():
        assert any(mark in line and kernel in line for line in lines), (
            f"no line of the server's log has the kernel's {stream} line and its id {kernel}:\n"
            + "\n".join(line for line in lines if mark in line))
