"""What happened to this server's sandboxed kernels that Jupyter itself can't tell.

Jupyter sees a kernel killed by its memory limit only as 'dead', and a start
that failed in the background only in the server's log. The provisioner
records those moments here with the reason; the server extension
(server_extension.py) hands them to JupyterLab, which shows them as
notifications. A restart makes a new provisioner for the same kernel, so the
record lives with the server process, not with one provisioner.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

# Kept: enough for every kernel of a busy server between two polls of the UI
# (every few seconds); older events were shown or nobody was looking.
KEPT = 200

KILLED = "killed"  # a limit killed the kernel
START_FAILED = "start-failed"  # the sandbox could not start
DEGRADED = "degraded"  # strict = false: started without some limits or devices


@dataclass(frozen=True)
class KernelEvent:
    id: int  # increasing: the UI asks for the events after the last one it saw
    kernel_id: str
    kernelspec: str
    kind: str
    message: str  # the cause
    fix: str | None  # what to do about it, shown on its own line
    time: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class KernelEventLog:
    """The last KEPT events of this process's kernels, oldest first."""

    def __init__(self, kept: int = KEPT) -> None:
        self._events: deque[KernelEvent] = deque(maxlen=kept)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # exit callbacks may come from the reaper's thread

    def record(self, kernel_id: str, kernelspec: str, kind: str, message: str,
               fix: str | None = None) -> KernelEvent:
        with self._lock:
            event = KernelEvent(next(self._ids), kernel_id, kernelspec, kind, message, fix,
                                time.time())
            self._events.append(event)
        return event

    def after(self, last_seen: int) -> list[KernelEvent]:
        with self._lock:
            return [e for e in self._events if e.id > last_seen]

    def last_id(self) -> int:
        with self._lock:
            return self._events[-1].id if self._events else 0


# This server's kernels: one log for the process, as the server is one process.
events = KernelEventLog()
