"""A Jupyter server (jupyter_server's or JupyterLab's) as a test's child process.

On a free loopback port, with a token, and with Jupyter's paths of its own
under a base dir: kernelspecs from base/share, runtime and config dirs made
here, files under base/root (the caller makes it), its log in a file. Its cwd
is the base dir, which Python puts on its sys.path: never a source tree whose
nsprovisioner would shadow the installed one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import stop_process


def start_jupyter(base: Path, token: str, log: Path, *args: str, app: str = "jupyter_server",
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m app` with `args`, once GET /api/status answers: the process and its
    URL. A server that does not come up is stopped, and its log is in the error."""
    for sub in ("runtime", "config"):
        (base / sub).mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {**os.environ, "JUPYTER_PATH": str(base / "share"),
                "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
                "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_TOKEN": token, **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", app, f"--port={port}", "--ip=127.0.0.1", "--no-browser",
             "--allow-root", f"--ServerApp.root_dir={base / 'root'}", *args],
            cwd=base, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc, 10)
                raise RuntimeError(f"{app} did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)
