"""A stand-in for the Jupyter server process, driven by the hostile tests.

Run as `python hostile_server.py REQUEST_FD REPLY_FD`: it reads one JSON
request per line from REQUEST_FD and writes one JSON reply per line to
REPLY_FD, so that its own stdin, stdout and stderr are whatever the test gave
it (a log file, a terminal), as a real server's are. It holds kernels the way
jupyter_server does: an AsyncMultiKernelManager with restarting kernel
managers, connection files in jupyter_runtime_dir(), kernelspecs resolved by
the default KernelSpecManager from this process's environment (HOME,
JUPYTER_PATH, sys.prefix, ...), and logs to its stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import site
import sys
import time
import traceback
from typing import IO, Any

from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_core.paths import (
    jupyter_config_dir,
    jupyter_config_path,
    jupyter_data_dir,
    jupyter_path,
    jupyter_runtime_dir,
)
from traitlets.config import Config


class Server:
    def __init__(self) -> None:
        self.log = logging.getLogger("server")
        runtime = jupyter_runtime_dir()
        os.makedirs(runtime, 0o700, exist_ok=True)  # as jupyter_server does
        self.mkm = AsyncMultiKernelManager(
            connection_dir=runtime, log=self.log,
            kernel_manager_class="jupyter_client.ioloop.AsyncIOLoopKernelManager",
            config=Config({"KernelRestarter": {"time_to_dead": 0.3, "restart_limit": 2}}))
        self.clients: dict[str, Any] = {}
        self.events: dict[str, list[str]] = {}

    async def op_paths(self) -> dict[str, Any]:
        return {"kernels": jupyter_path("kernels"), "config_dir": jupyter_config_dir(),
                "config_path": jupyter_config_path(), "data_dir": jupyter_data_dir(),
                "runtime_dir": jupyter_runtime_dir(), "prefix": sys.prefix,
                "site": site.getsitepackages(), "user_site": site.getusersitepackages(),
                "executable": sys.executable}

    async def op_start(self, name: str, cwd: str | None = None) -> dict[str, Any]:
        kid = await self.mkm.start_kernel(kernel_name=name, cwd=cwd)
        km = self.mkm.get_kernel(kid)
        self.events[kid] = []
        for event in ("restart", "dead"):
            km.add_restart_callback(lambda e=event, k=kid: self.events[k].append(e), event)
        await self._connect(kid)
        return {"id": kid, "connection_file": km.connection_file,
                "connection_info": json.loads(json.dumps(km.get_connection_info(),
                                                         default=lambda b: b.decode()))}

    async def _connect(self, kid: str) -> None:
        old = self.clients.pop(kid, None)
        if old is not None:
            old.stop_channels()
        kc = self.mkm.get_kernel(kid).client()
        kc.start_channels()
        self.clients[kid] = kc
        await kc.wait_for_ready(timeout=30)

    async def op_execute(self, id: str, code: str, timeout: float = 20) -> dict[str, Any]:
        out: list[str] = []
        ename: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                ename.append(msg["content"]["ename"])
                out.append("\n".join(msg["content"]["traceback"]))

        reply = await self.clients[id].execute_interactive(code, timeout=timeout,
                                                           output_hook=hook)
        return {"status": reply["content"]["status"], "out": "".join(out),
                "ename": ename[0] if ename else None}

    async def op_interrupt_during(self, id: str, code: str, marker: str,
                                  timeout: float = 8) -> dict[str, Any]:
        """Run `code`, interrupt it once it printed `marker`; how the cell ended, or 'timeout'."""
        kc = self.clients[id]
        msg_id = kc.execute(code)
        deadline = time.monotonic() + 15
        while True:
            msg = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["msg_type"] == "stream" and marker in msg["content"]["text"]:
                break
        await asyncio.sleep(0.3)
        begin = time.monotonic()
        await self.mkm.interrupt_kernel(id)
        end = begin + timeout
        while time.monotonic() < end:
            try:
                reply = await kc.get_shell_msg(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                break
            if reply["parent_header"].get("msg_id") == msg_id:
                return {"status": reply["content"]["status"],
                        "ename": reply["content"].get("ename"),
                        "seconds": time.monotonic() - begin}
        return {"status": "timeout", "ename": None, "seconds": time.monotonic() - begin}

    async def op_wait_event(self, id: str, timeout: float = 20) -> dict[str, Any]:
        """After the kernel died: the restarter's verdict, and whether a new kernel answers."""
        deadline = time.monotonic() + timeout
        while not self.events[id] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        km = self.mkm.get_kernel(id)
        while "restart" in self.events[id] and "dead" not in self.events[id]:
            if time.monotonic() > deadline:
                break
            try:  # a start that fails makes the restarter try again, then give up
                await self._connect(id)
                break
            except (RuntimeError, TimeoutError):
                await asyncio.sleep(0.1)
        return {"events": self.events[id], "alive": bool(await km.is_alive())}

    async def op_shutdown_all(self) -> dict[str, Any]:
        for kc in self.clients.values():
            kc.stop_channels()
        self.clients.clear()
        await self.mkm.shutdown_all(now=True)
        return {}


async def serve(requests: IO[bytes], replies: IO[str]) -> None:
    server = Server()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, requests.readline)
        if not line:
            break
        request = json.loads(line)
        op = request.pop("op")
        try:
            result = await getattr(server, f"op_{op}")(**request)
        except Exception as e:  # noqa: BLE001 - every request gets its reply, failures too
            server.log.error("%s failed: %s", op, traceback.format_exc())
            result = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(result) + "\n")
        replies.flush()
        if op == "shutdown_all":
            break


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(levelname)s %(name)s] %(message)s")
    requests, replies = int(sys.argv[1]), int(sys.argv[2])
    # The reply pipe is the test's, not part of what a server holds: a
    # kernel inheriting it would be a finding of its own, but not this one.
    os.set_inheritable(requests, False)
    os.set_inheritable(replies, False)
    with open(requests, "rb", buffering=0) as rfile, open(replies, "w") as wfile:
        asyncio.run(serve(rfile, wfile))


if __name__ == "__main__":
    main()
