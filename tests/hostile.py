"""The hostile tests' host: a home of its own and a server process that lives in it.

Every attack runs in a real sandboxed ipykernel that a separate server
process (hostile_server.py, jupyter_client's AsyncMultiKernelManager as in
jupyter_server) started. That process has the test's HOME, no JUPYTER_* or
XDG_* variables of the test run, and a user base inside that HOME, so that
what it resolves (kernelspecs, config, runtime and site dirs) is what a real
server resolves, and nothing a test does reaches the real home. The tests
then look at the host: files, what the next server process resolves or runs.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, final

from .conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SPEC = ROOT / "share/jupyter/kernels/python3-sandboxed/kernel.json"
DRIVER = Path(__file__).resolve().parent / "hostile_server.py"
SANDBOXED = "python3-sandboxed"
# Variables of the test run that would point the server elsewhere than its home.
FOREIGN_ENV = ("JUPYTER_", "XDG_CONFIG", "XDG_DATA", "XDG_CACHE", "XDG_STATE", "PYTHONUSERBASE",
               "PYTHONPATH", "PYTHONSTARTUP", "IPYTHONDIR", "MPLCONFIGDIR", "PIP_")


@dataclass
class Host:
    """A server's world: its HOME, its environment, its interpreter, and tmp outside HOME."""

    home: Path
    outside: Path
    env: dict[str, str]
    python: str

    def list_tree(self, top: Path) -> set[str]:
        """Every path under `top`: what a snapshot before and after a kernel's run compares."""
        return {os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files}

    def run_python(self, code: str) -> subprocess.CompletedProcess[str]:
        """`code` run by the server's interpreter in the server's environment: what the
        next server process would do at its start."""
        return subprocess.run([self.python, "-c", code], env=self.env, capture_output=True,
                              text=True, timeout=30, cwd=self.home, check=False)


def write_kernelspec(kernels: Path, name: str, config: dict[str, Any] | None = None) -> Path:
    """The shipped sandboxed kernelspec (argv 'python' = the server's interpreter)."""
    spec = json.loads(SHIPPED_SPEC.read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = config or {}
    spec["display_name"] = name
    (kernels / name).mkdir(parents=True, exist_ok=True)
    path = kernels / name / "kernel.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def make_host(tmp_path: Path, *, venv: bool = False) -> Host:
    """A fresh home under tmp_path with a few everyday entries.

    Without `venv`, the server is this interpreter and its kernelspecs (the
    shipped sandboxed one as 'python3-sandboxed', and 'nonet' with network
    'none') come from a JUPYTER_PATH dir outside the home. With `venv`, the
    server runs from a virtualenv inside the home (as `python -m venv
    ~/venv` makes it), holding the kernelspec in its own share/jupyter, the
    way `pip install nsprovisioner` puts it there.
    """
    home, outside = tmp_path / "home", tmp_path / "outside"
    for d in (home / "notebooks", home / ".config", home / ".cache" / "pip", home / ".ssh",
              home / "bin", outside):
        d.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env.update(HOME=str(home), PYTHONUSERBASE=str(home / ".local"), PYTHONDONTWRITEBYTECODE="1")
    python = sys.executable
    if venv:
        prefix = home / "venv"
        # --system-site-packages, as people make them to reuse what is installed;
        # it also enables the user site, as on a plain Python
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                        str(prefix)], check=True)
        purelib = subprocess.run([str(prefix / "bin/python"), "-c",
                                  "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        # this test run's packages (jupyter_client, ipykernel, nsprovisioner)
        Path(purelib, "_test_run_packages.pth").write_text("\n".join(site.getsitepackages()))
        write_kernelspec(prefix / "share/jupyter/kernels", SANDBOXED)
        write_kernelspec(prefix / "share/jupyter/kernels", "nonet", {"network": "none"})
        write_kernelspec(prefix / "share/jupyter/kernels", "egress", {"network": "egress"})
        python = str(prefix / "bin/python")
        env["PATH"] = f"{prefix / 'bin'}:{env.get('PATH', os.defpath)}"
        env["VIRTUAL_ENV"] = str(prefix)
    else:
        share = tmp_path / "share"
        write_kernelspec(share / "kernels", SANDBOXED)
        write_kernelspec(share / "kernels", "nonet", {"network": "none"})
        write_kernelspec(share / "kernels", "egress", {"network": "egress"})
        env["JUPYTER_PATH"] = str(share)
    return Host(home=home, outside=outside, env=env, python=python)


@final
class ServerProcess:
    """hostile_server.py in the host's environment; its stdio is `stdio` (default: a log)."""

    def __init__(self, host: Host, log: Path, stdio: int | None = None) -> None:
        self.log_path = log
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        with open(log, "ab") as logfile:
            fd = logfile.fileno() if stdio is None else stdio
            self.proc = subprocess.Popen(
                [host.python, str(DRIVER), str(req_r), str(rep_w)], env=host.env,
                cwd=host.home, pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL if stdio is None
                else fd, stdout=fd, stderr=fd, start_new_session=stdio is None)
        os.close(req_r)
        os.close(rep_w)
        self._requests: IO[str] = os.fdopen(self._req_w, "w")
        self._replies: IO[str] = os.fdopen(self._rep_r)

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        self._requests.write(json.dumps({"op": op, **args}) + "\n")
        self._requests.flush()
        line = self._replies.readline()
        if not line:
            raise AssertionError(f"the server process ended; its log:\n{self.log()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        """As calling it, with an error reply a test failure that shows the server's log."""
        reply = self(op, **args)
        assert "error" not in reply, f"{op}: {reply['error']}\n{self.log()}"
        return reply

    def execute(self, kernel: str, code: str, timeout: float = 20) -> str:
        """Run `code` in a kernel; its output, after asserting the cell ran ok."""
        reply = self.ok("execute", id=kernel, code=code, timeout=timeout)
        assert reply["status"] == "ok", re.sub(r"\x1b\[[0-9;]*m", "", reply["out"])
        return str(reply["out"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self("shutdown_all")
            except (OSError, ValueError, AssertionError):
                pass
        for f in (self._requests, self._replies):
            try:
                f.close()
            except OSError:
                pass
        stop_process(self.proc, 20, terminate=False)  # its requests closed: it ends

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
