"""A hostile notebook can't reach the host's path-based Unix sockets (issue 11, attack 6).

/run holds the sockets of host services (D-Bus, systemd, docker.sock, the
user's session bus under /run/user/UID). A read-only mount does not stop
connect(), so they must be out of sight, in every network mode. What
programs legitimately read there (resolv.conf's target) must keep working.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PROBE_HELPERS
from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def host_service() -> Iterator[tuple[Path, socket.socket]]:
    """A listening Unix socket where host services keep theirs: /run as root, else the
    user's /run/user/UID (XDG_RUNTIME_DIR)."""
    if os.geteuid() == 0:
        base = Path("/run")
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}")
        if not base.is_dir() or not os.access(base, os.W_OK):
            pytest.skip(f"this user has no runtime dir under /run ({base} is missing): "
                        "no session bus a kernel could reach either")
    directory = base / f"nsprov-hostile-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = directory / "service.sock"
        listener.bind(str(path))
        os.chmod(path, 0o777)
        listener.listen(8)
        listener.setblocking(False)
        yield path, listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


CONNECT = PROBE_HELPERS + """
import socket
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(3)
        s.connect(path)
        s.sendall(b"hello from the sandbox")
    finally:
        s.close()
paths = [SOCKET] + (["/var" + SOCKET] if SOCKET.startswith("/run/") else [])
print(json.dumps({"connect": {p: err(connect, p) for p in paths},
                  "resolv": err(read, "/etc/resolv.conf") or read("/etc/resolv.conf")}))
"""


@pytest.mark.parametrize("kernelspec", [SANDBOXED, "nonet"], ids=["host", "none"])
def test_host_unix_socket_is_unreachable(tmp_path: Path, kernelspec: str,
                                         host_service: tuple[Path, socket.socket]) -> None:
    path, listener = host_service
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=kernelspec, cwd=str(host.home / "notebooks"))["id"]
        seen = json.loads(server.execute(kernel, f"SOCKET = {str(path)!r}\n" + CONNECT))
    try:
        peer, _ = listener.accept()
        peer.close()
        reached = True
    except BlockingIOError:
        reached = False
    assert not reached, f"the host's socket {path} got a connection from the kernel: {seen}"
    assert all(seen["connect"].values()), seen["connect"]
    try:
        resolv = Path("/etc/resolv.conf").read_text()
    except OSError:
        return
    assert seen["resolv"] == resolv, "name resolution config is no longer readable inside"
