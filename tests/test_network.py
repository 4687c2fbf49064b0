"""network = "none": kernels that reach nothing, yet talk to Jupyter over ipc sockets.

(Interrupt, restart, shutdown, the restarter and culling with network none run
in the parity tests: test_provisioner.py's "nonet" variant, test_server.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from nsprovisioner import SandboxError
from nsprovisioner.ipcdir import MAX_SOCKET_PATH, server_dir, sockets_parent

from .conftest import execute_ok, run

pytestmark = pytest.mark.timeout(120)


def write_spec(kernels: Path, name: str, network: str, argv: list[str] | None = None) -> None:
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(json.dumps({
        "argv": argv or [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner",
                                            "config": {"network": network}}}}))


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    kernels = tmp_path / "kernels"
    write_spec(kernels, "nonet", "none")
    write_spec(kernels, "hostnet", "host")
    write_spec(kernels, "broken", "none", argv=["no-such-kernel", "{connection_file}"])
    return kernels


def manager(kernels: Path, name: str) -> AsyncKernelManager:
    return AsyncKernelManager(kernel_name=name,
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


@asynccontextmanager
async def started(km: AsyncKernelManager) -> AsyncIterator[Any]:
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        yield kc
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


PROBE = r"""
import errno, json, socket, threading, time
def attempt(addr):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(addr)
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
threading.Thread(target=lambda: srv.accept()[0].sendall(b"hi"), daemon=True).start()
cli = socket.create_connection(srv.getsockname(), timeout=2)
own_loopback = cli.recv(2).decode()
t0 = time.monotonic()
try:
    socket.getaddrinfo("pypi.org", 443)
    dns = "resolved"
except OSError as e:
    dns = type(e).__name__
print(json.dumps({"host_listener": attempt(("127.0.0.1", HOST_PORT)),
                  "jupyter_port": attempt(("127.0.0.1", JUPYTER_PORT)),
                  "own_loopback": own_loopback, "dns": dns,
                  "dns_seconds": time.monotonic() - t0,
                  "interfaces": [name for _, name in socket.if_nameindex()]}))
"""


def test_network_none_reaches_nothing_but_its_own_loopback(kernels: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    host_port = listener.getsockname()[1]

    async def main() -> dict[str, Any]:
        jupyter = manager(kernels, "hostnet")  # a kernel on the host's loopback, over tcp
        async with started(jupyter):
            km = manager(kernels, "nonet")
            async with started(km) as kc:
                assert km.transport == "ipc"
                code = (PROBE.replace("HOST_PORT", str(host_port))
                        .replace("JUPYTER_PORT", str(jupyter.shell_port)))
                result: dict[str, Any] = json.loads(await execute_ok(kc, code))
                return result
    try:
        result = run(main())
    finally:
        listener.close()
    assert result["host_listener"] == "ECONNREFUSED"  # its own 127.0.0.1 has no listener
    assert result["jupyter_port"] == "ECONNREFUSED"
    assert result["own_loopback"] == "hi"
    assert result["interfaces"] == ["lo"]
    assert result["dns"] == "gaierror"
    assert result["dns_seconds"] < 1.0


def test_a_kernel_cannot_reach_another_kernels_sockets(kernels: Path) -> None:
    async def main() -> tuple[str, str]:
        km_a, km_b = manager(kernels, "nonet"), manager(kernels, "nonet")
        async with started(km_a) as kc_a, started(km_b):
            other = f"{km_b.ip}-{km_b.shell_port}"
            assert os.path.exists(other)
            probe = (f"import socket, errno, os\n"
                     f"s = socket.socket(socket.AF_UNIX)\n"
                     f"try:\n    s.connect({other!r}); print('connected')\n"
                     f"except OSError as e:\n    print(errno.errorcode[e.errno])\n"
                     f"try:\n    print(os.listdir({os.path.dirname(km_a.ip)!r}))\n"
                     f"    print(os.listdir({os.path.dirname(os.path.dirname(other))!r}))\n"
                     f"except OSError as e:\n    print(errno.errorcode[e.errno])\n")
            lines = (await execute_ok(kc_a, probe)).splitlines()
            return lines[0], "\n".join(lines[1:])
    connect, listing = run(main())
    assert connect in ("ENOENT", "EACCES")
    own, others = listing.splitlines()
    assert "k-1" in own               # its own sockets are there
    assert others == "EACCES"         # every other kernel's directory is hidden


def kernel_dirs() -> set[str]:
    """This server's kernels' socket dirs and connection-file records (its own dir may
    stay while it lives; other servers on the machine have theirs)."""
    parent = sockets_parent()
    mine = os.path.basename(server_dir())
    return {entry for entry in os.listdir(os.path.join(parent, mine))}


def test_socket_files_are_removed_on_shutdown_restart_and_failure(kernels: Path) -> None:
    before = kernel_dirs()

    async def main() -> None:
        km = manager(kernels, "nonet")
        async with started(km) as kc:
            directory = os.path.dirname(km.ip)
            sockets = sorted(os.listdir(directory))
            assert len(sockets) == 5
            await km.restart_kernel()
            # (wait_for_ready may take a kernel_info reply the first kernel queued
            # before it died: wait for the new kernel's sockets themselves)
            deadline = asyncio.get_running_loop().time() + 30
            while (sorted(os.listdir(directory)) != sockets
                   and asyncio.get_running_loop().time() < deadline):
                await asyncio.sleep(0.05)
            assert sorted(os.listdir(directory)) == sockets  # remade, same paths
            await kc.wait_for_ready(timeout=30)
        assert not os.path.exists(directory)
        with pytest.raises(SandboxError, match="no-such-kernel"):
            await manager(kernels, "broken").start_kernel()
    run(main())
    assert kernel_dirs() == before


def test_too_long_socket_paths_are_refused_clearly(kernels: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))

    async def main() -> None:
        km = manager(kernels, "nonet")
        with pytest.raises(SandboxError) as failure:
            await km.start_kernel()
        assert f"at most {MAX_SOCKET_PATH} bytes" in str(failure.value)
        assert not os.path.exists(km.connection_file)
    run(main())
