"""A kernel's stdout and stderr, relayed line by line into the server's log.

A kernel never gets the server's own fds 1 and 2: with the server logging to
a file, the kernel could read the log (the token URL) through /proc/1/fd/2;
with the server in a terminal, it could read what is typed there. It writes
into pipes instead, which the server reads on its event loop. A kernel that
floods its output can't fill the server's log: past a burst, lines are
dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import IO

MAX_LINE = 4096      # bytes of one line that reach the log
RATE = 100.0         # lines per second, sustained ...
BURST = 1000.0       # ... after a burst of this many


class OutputRelay:
    """Reads the pipes of one kernel until EOF; close() stops early."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[logging.Logger],
                 kernel_id: str, streams: dict[str, IO[bytes] | None]) -> None:
        self.log = log
        self.kernel_id = kernel_id
        self.loop = asyncio.get_running_loop()
        self.fds: dict[int, str] = {}
        self.partial: dict[int, bytes] = {}
        self.tokens = BURST
        self.refilled = time.monotonic()
        self.dropped = 0
        for name, stream in streams.items():
            if stream is None:
                continue
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self.fds[fd] = name
            self.partial[fd] = b""
            self.loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> bool:
        """Read once; False when there is nothing more for now."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._finish(fd)
            return False
        lines = (self.partial[fd] + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:  # a line without end: log what we have
            lines.append(rest)
            rest = b""
        self.partial[fd] = rest
        for line in lines:
            self._emit(fd, line)
        return True

    def _emit(self, fd: int, line: bytes) -> None:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.refilled) * RATE)
        self.refilled = now
        if self.tokens < 1:
            self.dropped += 1
            return
        self.tokens -= 1
        if self.dropped:
            self.log.warning("kernel %s: %d line(s) of output dropped (more than %d a second)",
                             self.kernel_id, self.dropped, int(RATE))
            self.dropped = 0
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        self.log.info("kernel %s %s: %s", self.kernel_id, self.fds[fd], text)

    def _finish(self, fd: int) -> None:
        if self.partial.get(fd):
            self._emit(fd, self.partial[fd])
        self.loop.remove_reader(fd)
        self.fds.pop(fd, None)
        self.partial.pop(fd, None)

    def close(self) -> None:
        """Log what is left in the pipes, then stop (the pipes are closed by their owner,
        SandboxProcess). The kernel is dead by then: nothing more can arrive."""
        for fd in list(self.fds):
            while fd in self.fds and self._readable(fd):
                pass
            if fd in self.fds:
                self._finish(fd)
