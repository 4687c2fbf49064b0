"""A real jupyter_server with the opt-in config that sandboxes every kernel.

REST to start, interrupt, restart and delete kernels, the websocket to run
code, culling of idle kernels, and a bad kernelspec's error in the response.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import websocket_connect

from .conftest import run, stop_process
from .jupyter_process import start_jupyter

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_ALL = ROOT / "share/jupyter/nsprovisioner/jupyter_server_config_sandbox_all.py"
TOKEN = "test-token-" + uuid.uuid4().hex
KERNEL_ARGV = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]

pytestmark = pytest.mark.timeout(120)


def kernelspec(kernels: Path, name: str, metadata: dict[str, Any]) -> None:
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(json.dumps(
        {"argv": KERNEL_ARGV, "display_name": name, "language": "python",
         "metadata": metadata}))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a jupyter_server whose kernels are sandboxed unless they say otherwise."""
    base = tmp_path_factory.mktemp("server")
    kernels = base / "share" / "kernels"
    kernelspec(kernels, "plain", {})  # no provisioner: gets the server's default
    kernelspec(kernels, "local", {"kernel_provisioner": {"provisioner_name":
                                                         "local-provisioner"}})
    kernelspec(kernels, "nonet", {"kernel_provisioner": {  # the ipc transport
        "provisioner_name": "namespace-provisioner", "config": {"network": "none"}}})
    kernelspec(kernels, "egress", {"kernel_provisioner": {
        "provisioner_name": "namespace-provisioner", "config": {"network": "egress"}}})
    kernelspec(kernels, "typo", {"kernel_provisioner": {
        "provisioner_name": "namespace-provisioner", "config": {"memroy_limit": "1G"}}})
    (base / "root").mkdir()
    proc, url = start_jupyter(base, TOKEN, base / "server.log", f"--config={SANDBOX_ALL}",
                              "--MappingKernelManager.cull_idle_timeout=3",
                              "--MappingKernelManager.cull_interval=1")
    try:
        yield url
    finally:
        stop_process(proc, 15)


def request(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"token {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Channels:
    """The kernel's websocket, speaking Jupyter's JSON message protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.session = uuid.uuid4().hex

    async def execute(self, code: str, timeout: float = 15,
                      printed: asyncio.Event | None = None) -> tuple[str, str]:
        """Run `code`: its reply's status and its output; `printed` is set once the
        code's own output arrives (then it runs, and a SIGINT interrupts it)."""
        msg_id = uuid.uuid4().hex
        await self.ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                       "session": self.session, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False}}))
        out, status = [], None
        deadline = time.monotonic() + timeout
        while status is None or not out_done(out):
            text = await asyncio.wait_for(self.ws.read_message(), deadline - time.monotonic())
            msg = json.loads(text)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
                if printed is not None:
                    printed.set()
            elif msg["msg_type"] == "execute_reply":
                status = msg["content"]["status"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                out.append("")  # iopub is done for this request
        return status, "".join(out)


def out_done(out: list[str]) -> bool:
    return bool(out) and out[-1] == ""


def ws_url(server: str, kernel_id: str) -> str:
    return f"ws{server[4:]}/api/kernels/{kernel_id}/channels?token={TOKEN}"


PIDNS = "import os; print(open('/proc/1/cmdline').read().split(chr(0))[0], " \
        "os.readlink('/proc/self/ns/pid'), 'JUPYTER_TOKEN' in os.environ)"


@pytest.mark.parametrize("name", ["plain", "nonet", "egress"])
def test_rest_and_websocket_lifecycle_in_the_sandbox(server: str, name: str) -> None:
    status, kernel = request("POST", server + "/api/kernels", {"name": name})
    assert status == 201, kernel
    kid = kernel["id"]

    async def main() -> None:
        ws = await websocket_connect(ws_url(server, kid))
        ch = Channels(ws)
        try:
            status, out = await ch.execute(PIDNS)
            pid1, pidns, token_seen = out.split()
            assert (status, pid1, token_seen) == ("ok", "nsinit", "False")
            assert pidns != os.readlink("/proc/self/ns/pid")
            begin = time.monotonic()
            printed = asyncio.Event()
            running = asyncio.ensure_future(ch.execute(
                "import os; print('sleeping', flush=True); os.system('sleep 30')", 20, printed))
            await asyncio.wait_for(printed.wait(), 15)
            assert request("POST", f"{server}/api/kernels/{kid}/interrupt")[0] == 204
            await running
            assert time.monotonic() - begin < 8
            await ch.execute("import builtins; builtins.nsprov_marker = 1")
            assert request("POST", f"{server}/api/kernels/{kid}/restart")[0] == 200
            # Reconnect, as JupyterLab does after a restart: the server answers a new
            # websocket once the kernel's iopub delivers. The old one's zmq sockets
            # reconnect by themselves, but a request sent through them can run before
            # iopub has resubscribed, and its output is then lost in part or whole.
            ws.close()
            ws = ch.ws = await websocket_connect(ws_url(server, kid))
            status, out = await ch.execute(
                PIDNS + "; import builtins; print(hasattr(builtins, 'nsprov_marker'))")
            # a new kernel (no marker) under a new init; the pid namespace's inode
            # number may repeat, as Linux reuses freed namespace numbers
            words = out.split()
            assert (status, words[:1], words[-1:]) == ("ok", ["nsinit"], ["False"]), out
        finally:
            ws.close()
    run(main())
    assert request("DELETE", f"{server}/api/kernels/{kid}")[0] == 204
    assert kid not in [k["id"] for k in request("GET", server + "/api/kernels")[1]]


@pytest.mark.parametrize("name", ["local", "plain", "nonet", "egress"])
def test_idle_kernels_are_culled(server: str, name: str) -> None:
    status, kernel = request("POST", server + "/api/kernels", {"name": name})
    assert status == 201
    deadline = time.monotonic() + 30
    while request("GET", f"{server}/api/kernels/{kernel['id']}")[0] != 404:
        assert time.monotonic() < deadline, "idle kernel was not culled"
        time.sleep(0.5)


def test_bad_kernelspec_option_reaches_the_client(server: str) -> None:
    # JupyterLab opens notebooks through the sessions API, which shows the error's text
    status, body = request("POST", server + "/api/sessions", {
        "path": "x.ipynb", "type": "notebook", "kernel": {"name": "typo"}})
    assert status == 500
    assert "unknown option 'memroy_limit'" in body["message"]
    assert "kernelspec 'typo'" in body["message"]
