"""The library's log records in the Jupyter server's log, and a launch's warnings kept.

The modules below the provisioner log through `logging.getLogger(__name__)`
("nsprovisioner.cgroups", ...). In a Jupyter server nothing handles that
tree, so Python's last-resort handler printed a warning to stderr bare, without
Jupyter's "[W 12:00:00.000 ServerApp]" prefix or its log file. Routed here into
the server's own logger, they read like every other server line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_LOGGER = "nsprovisioner"


class _ToLogger(logging.Handler):
    """Hands each record to another logger's handlers (the record keeps its name).

    Not the root logger's: the record goes on to those by itself, and must not
    arrive there a second time through the other logger's parents."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = self.target
        while logger is not None and logger is not logging.getLogger():
            for handler in logger.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            logger = logger.parent if logger.propagate else None


class _OnceOnly(logging.Filter):
    """Drops a record carrying an exception the provisioner has logged already.

    A sandbox that can't start is logged by the provisioner in one line with
    its cause and fix; jupyter_client then logged it again with a full
    traceback through every layer of the start (twice over, with the server's
    own "Error starting kernel") that says nothing the line didn't.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, LOGGED, False)


LOGGED = "nsprovisioner_logged"  # set on an exception once it is in the log


def mark_logged(error: BaseException) -> None:
    setattr(error, LOGGED, True)


def route_library_log(server_log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> None:
    """Send the library's records to `server_log`, and keep a failure the provisioner
    logged out of the rest of the server's log (once per process; later calls only
    follow its level, which --debug may have changed)."""
    target = server_log.logger if isinstance(server_log, logging.LoggerAdapter) else server_log
    library = logging.getLogger(LIBRARY_LOGGER)
    library.setLevel(target.getEffectiveLevel())
    if any(isinstance(h, _ToLogger) for h in library.handlers):
        return
    if not any(isinstance(f, _OnceOnly) for f in target.filters):
        target.addFilter(_OnceOnly())
    if target.name == "root" or target.name.startswith(LIBRARY_LOGGER):
        return  # records reach it by propagation already
    # Records still propagate to the root logger: with this handler in the chain,
    # the last-resort stderr handler no longer fires; a handler a program set on
    # the root logger itself (pytest's caplog, logging.basicConfig) still sees them.
    library.addHandler(_ToLogger(target))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def warnings_of_launch() -> Iterator[list[str]]:
    """The library's warnings while the block runs (strict = false: what was left
    out), for the UI. Launches that overlap on the event loop may see each other's."""
    collect = _Collect()
    library = logging.getLogger(LIBRARY_LOGGER)
    library.addHandler(collect)
    try:
        yield collect.messages
    finally:
        library.removeHandler(collect)
