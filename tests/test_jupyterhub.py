"""JupyterHub end to end: every user's kernels sandboxed by the shipped opt-in config.

A real JupyterHub (PyPI) with configurable-http-proxy (npm) starts single-user
servers for two local users created here; through the proxy and the REST API
the test starts each user's server and a kernel, executes code over the
websocket, and checks what the code could see.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import stop_process

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="JupyterHub's LocalProcessSpawner must run as root to start servers as other users")

USERS = ("nsphub-alice", "nsphub-bob")
SANDBOX_ALL = "share/jupyter/nsprovisioner/jupyter_server_config_sandbox_all.py"


def hub_config(workdir: Path, port: int, token: str, users: tuple[str, ...]) -> str:
    """A hub on `port` (its own hub and proxy API ports), state in `workdir`, the dummy
    authenticator for `users`, and a service whose `token` may start and reach servers."""
    return f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {set(users)!r}
c.JupyterHub.services = [{{"name": "e2e", "api_token": "{token}"}}]
c.JupyterHub.load_roles = [{{"name": "e2e", "services": ["e2e"],
    "scopes": ["admin:users", "admin:servers", "access:servers", "list:users"]}}]
"""


def sandbox_all_config() -> str:
    for base in (Path(sys.prefix), Path(__file__).resolve().parents[1]):
        if (base / SANDBOX_ALL).is_file():
            return str(base / SANDBOX_ALL)
    pytest.fail(f"{SANDBOX_ALL} is not installed under {sys.prefix}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Hub:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def request(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def start_server(self, user: str) -> None:
        self.request("POST", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            model = self.request("GET", f"/hub/api/users/{user}")
            assert isinstance(model, dict)
            server = model.get("servers", {}).get("", {})
            if server.get("ready"):
                return
            time.sleep(0.5)
        pytest.fail(f"{user}'s server did not become ready")

    def execute(self, user: str, kernel_id: str, code: str) -> str:
        """Run code in the kernel over the websocket, through the proxy; its stdout."""
        from websocket import create_connection

        ws_url = self.url.replace("http", "ws", 1) + f"/user/{user}/api/kernels/{kernel_id}/channels"
        ws = create_connection(ws_url, header=[f"Authorization: token {self.token}"], timeout=60)
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "e2e",
                       "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False},
        }))
        out, error = [], None
        try:
            while True:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    error = "\n".join(msg["content"]["traceback"])
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    break
        finally:
            ws.close()
        assert error is None, error
        return "".join(out)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    if shutil.which("configurable-http-proxy") is None:
        pytest.fail("configurable-http-proxy is missing: `npm install -g configurable-http-proxy`")
    for user in USERS:
        subprocess.run(["useradd", "--create-home", user], check=False, capture_output=True)
    workdir = tmp_path_factory.mktemp("hub")
    os.chmod(workdir, 0o755)
    token = secrets.token_hex(16)
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    (workdir / "jupyterhub_config.py").write_text(hub_config(workdir, port, token, USERS) + f"""
c.Spawner.cmd = ["{bindir}/jupyterhub-singleuser"]
c.Spawner.args = ["--config={sandbox_all_config()}"]
c.Spawner.default_url = "/tree"
c.Spawner.notebook_dir = "~"
c.Spawner.environment = {{"PATH": "{bindir}:/usr/bin:/bin"}}
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
""")
    log = open(workdir / "hub.log", "w")  # noqa: SIM115 - closed in the teardown below
    proc = subprocess.Popen([f"{bindir}/jupyterhub", "-f", str(workdir / "jupyterhub_config.py")],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    hub = Hub(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                hub.request("GET", "/hub/api/")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the hub did not start:\n" + (workdir / "hub.log").read_text())
                time.sleep(0.3)
        for user in USERS:
            try:
                hub.request("POST", f"/hub/api/users/{user}")
            except urllib.error.HTTPError as e:
                if e.code != 409:  # 409: allowed_users already made them
                    raise
        yield hub
    finally:
        for user in USERS:
            try:
                hub.request("DELETE", f"/hub/api/users/{user}/server")
            except urllib.error.URLError:
                pass
        time.sleep(1)
        stop_process(proc, 30)
        log.close()
        for user in USERS:
            subprocess.run(["pkill", "-KILL", "-u", user], check=False)
            subprocess.run(["userdel", "-r", user], check=False, capture_output=True)


REPORT = r"""
import json, os
from jupyter_core.paths import jupyter_runtime_dir
runtime = jupyter_runtime_dir()
try:
    runtime_listing = os.listdir(runtime)
except OSError as e:
    runtime_listing = f"{type(e).__name__}"
print(json.dumps({
    "pidns": os.readlink("/proc/self/ns/pid"),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "ppid": os.getppid(),
    "uid_map": open("/proc/self/uid_map").read().split(),
    "runtime": runtime_listing,
    "tmp": sorted(os.listdir("/tmp")),
    "env_token": [k for k in os.environ if "TOKEN" in k],
}))
"""


def start_kernel(hub: Hub, user: str) -> str:
    hub.start_server(user)
    kernel = hub.request("POST", f"/user/{user}/api/kernels", {"name": "python3"})
    assert isinstance(kernel, dict)
    return str(kernel["id"])


def test_every_users_kernel_is_sandboxed(hub: Hub) -> None:
    alice, bob = USERS
    alice_kernel = start_kernel(hub, alice)
    report = json.loads(hub.execute(alice, alice_kernel, REPORT))
    assert report["pidns"] != os.readlink("/proc/self/ns/pid")
    assert report["ppid"] == 1                      # the init's child
    assert len(report["procs"]) <= 4                # init, kernel, maybe a helper: no host pids
    uid = pwd.getpwnam(alice).pw_uid
    assert report["uid_map"] == [str(uid), str(uid), "1"]  # the user's own uid outside
    # the runtime dir holds only this kernel's own connection file
    assert report["runtime"] == "PermissionError" or all(
        name.startswith(f"kernel-{alice_kernel}") for name in report["runtime"]), report
    assert report["env_token"] == []                # JUPYTERHUB_API_TOKEN etc. not passed

    hub.execute(alice, alice_kernel, "open('/tmp/alice-secret', 'w').write('s3cret')")
    bob_kernel = start_kernel(hub, bob)
    bob_report = json.loads(hub.execute(bob, bob_kernel, REPORT))
    assert "alice-secret" not in bob_report["tmp"]
    assert bob_report["pidns"] != report["pidns"]
    # bob sees only his own sandbox: none of alice's kernel processes
    assert len(bob_report["procs"]) <= 4
    alice_again = json.loads(hub.execute(alice, alice_kernel, REPORT))
    assert "alice-secret" in alice_again["tmp"]
