"""A kernel's messages are readable by its server alone (issue 11, attack 9).

Jupyter signs messages but does not encrypt them: whoever can subscribe to a
kernel's iopub socket reads its outputs. Over tcp that is any local process,
another sandboxed kernel included (the port is in /proc/net/tcp). Here a
second sandboxed kernel of the same server tries, with the first kernel's
address in hand.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(60)

LISTEN = """
import threading, zmq
heard, enough = [], threading.Event()
def listen():
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ENDPOINT)
    while not enough.is_set():
        if sub.poll(100):
            heard.append(b"".join(sub.recv_multipart()))
    sub.close(0)
listener = threading.Thread(target=listen)
listener.start()
"""

VERDICT = """
enough.set()
listener.join()
print(json.dumps({"messages": len(heard), "secret": any(SECRET.encode() in m for m in heard),
                  "socket_dir_visible": SOCKET_DIR is not None and os.path.exists(SOCKET_DIR)}))
"""


@pytest.mark.parametrize("victim", [SANDBOXED, "nonet"], ids=["host", "none"])
def test_another_kernel_cannot_subscribe_to_iopub(tmp_path: Path, victim: str) -> None:
    host = make_host(tmp_path)
    secret = f"OUTPUT-SECRET-{uuid.uuid4().hex}"
    with ServerProcess(host, tmp_path / "server.log") as server:
        started = server.ok("start", name=victim, cwd=str(host.home / "notebooks"))
        info = json.loads(Path(started["connection_file"]).read_text())
        if info["transport"] == "tcp":
            endpoint = f"tcp://{info['ip']}:{info['iopub_port']}"
            socket_dir = None
        else:
            endpoint = f"ipc://{info['ip']}-{info['iopub_port']}"
            socket_dir = os.path.dirname(info["ip"])
        spy = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        server.execute(spy, f"ENDPOINT = {endpoint!r}\n" + LISTEN)
        for _ in range(6):  # zmq's subscriptions take a moment to arrive
            server.execute(started["id"], f"import time; print({secret!r}); time.sleep(0.25)")
        heard = json.loads(server.execute(spy, f"import json, os\nSECRET, SOCKET_DIR = "
                                               f"{secret!r}, {socket_dir!r}\n" + VERDICT))
    assert not heard["secret"], f"another kernel read this kernel's output over {endpoint}"
    assert info["transport"] == "ipc", "a sandboxed kernel's channels are on tcp"
    assert not heard["socket_dir_visible"], f"another kernel sees {socket_dir}"
