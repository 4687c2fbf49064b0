"""A hostile notebook can't redirect what the server hides or binds (issue 11, attacks 4, 5).

Renaming an ancestor of the hidden runtime dir, and swapping a component of
the kernel's cwd for a symlink before a restart, are both done with the
rights every kernel has over its writable home. The tests check what the
server does next: where it writes the next kernel's connection file, and
what it binds as the restarted kernel's cwd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import PROBE_HELPERS
from .hostile import SANDBOXED, ServerProcess, make_host

pytestmark = pytest.mark.timeout(60)

RENAME = PROBE_HELPERS + """
moved = err(os.rename, ANCESTOR, ANCESTOR + ".moved")
# where the server's later connection files go, if the old path is free
remade = err(os.makedirs, RUNTIME, 0o700) if moved is None else "not tried"
print(json.dumps({"rename": moved, "remade": remade}))
"""


@pytest.mark.parametrize("up", [1, 2, 3], ids=["jupyter", "share", "local"])
def test_renaming_a_runtime_dir_ancestor_exposes_no_later_key(tmp_path: Path, up: int) -> None:
    """~/.local/share/jupyter/runtime: rename the ancestor `up` levels above the runtime
    dir, remake the path, and wait for the next kernel's connection file there."""
    host = make_host(tmp_path)
    with ServerProcess(host, tmp_path / "server.log") as server:
        runtime = Path(server.ok("paths")["runtime_dir"])
        ancestor = runtime.parents[up - 1]
        assert ancestor.is_relative_to(host.home) and ancestor != host.home
        runtime_inode = runtime.stat().st_ino
        first = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        tried = json.loads(server.execute(
            first, f"ANCESTOR, RUNTIME = {str(ancestor)!r}, {str(runtime)!r}\n" + RENAME))
        later = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))
        key = later["connection_info"]["key"]
        seen = server.execute(first, PROBE_HELPERS + (
            f"print(err(read, {later['connection_file']!r}) or read({later['connection_file']!r}))"))
    assert key not in seen, f"the first kernel read the later kernel's key ({tried})"
    assert runtime.stat().st_ino == runtime_inode, f"the runtime dir was replaced ({tried})"
    assert tried["rename"] is not None


SWAP = PROBE_HELPERS + """
import threading
project = os.path.dirname(os.getcwd())
swapped = {"rename": err(os.rename, project, project + ".old")}
if swapped["rename"] is None:
    os.mkdir(project)
    os.symlink(OUTSIDE, os.path.join(project, os.path.basename(CWD)))
print(json.dumps(swapped))
threading.Timer(0.5, os._exit, (1,)).start()  # the restarter takes it from here
"""

LOOK = PROBE_HELPERS + """
print(json.dumps({"cwd": os.getcwd(), "listing": sorted(os.listdir(".")),
                  "secret": err(read, os.path.join(OUTSIDE, "secret.txt")) or "read",
                  "write": err(write, "written-by-the-restarted-kernel")}))
"""


def test_cwd_symlink_swap_before_restart_binds_nothing_else(tmp_path: Path) -> None:
    """cwd two levels below the writable home: rename its parent, recreate it with the
    cwd's name a symlink to a host dir the kernel must not reach, die, get restarted."""
    host = make_host(tmp_path)
    cwd = host.home / "project" / "notebooks"
    cwd.mkdir(parents=True)
    hostdir = host.outside / "hostdir"  # outside the home, not visible in the sandbox
    hostdir.mkdir()
    (hostdir / "secret.txt").write_text("host secret\n")
    variables = f"OUTSIDE, CWD = {str(hostdir)!r}, {str(cwd)!r}\n"
    with ServerProcess(host, tmp_path / "server.log") as server:
        kernel = server.ok("start", name=SANDBOXED, cwd=str(cwd))["id"]
        swapped = json.loads(server.execute(kernel, variables + SWAP))
        after = server.ok("wait_event", id=kernel, timeout=20)
        seen = json.loads(server.execute(kernel, variables + LOOK)) if after["alive"] else None
        log = server.log()
    assert sorted(os.listdir(hostdir)) == ["secret.txt"], f"the host dir was written: {seen}"
    assert (hostdir / "secret.txt").read_text() == "host secret\n"
    if seen is None:  # the restart failed: it must say why
        assert str(cwd) in log, f"the failed restart's error does not name the cwd:\n{log}"
    else:
        assert "secret.txt" not in seen["listing"] and seen["secret"] != "read", (
            f"the restarted kernel sees the host dir {hostdir} (swap: {swapped}): {seen}")
        assert os.path.realpath(seen["cwd"]) != str(hostdir)


PLANT = PROBE_HELPERS + """
base = os.environ["PYTHONUSERBASE"]               # <state>/python/<kernelspec>
python = os.path.dirname(base)
planted = {"rename": err(os.rename, python, python + ".old")}
if planted["rename"] is None:
    planted["symlink"] = err(os.symlink, TARGET, python)
print(json.dumps({**planted, "state": os.path.dirname(python), "name": os.path.basename(base)}))
"""


def test_a_state_dir_symlink_makes_the_server_create_nothing_outside(tmp_path: Path) -> None:
    """The sandboxes' state dir is writable inside: swap its python/ for a symlink to
    ~/.jupyter (read-only inside) and start the next kernel. The server must not
    create <kernelspec name> in ~/.jupyter through it; the next kernel works."""
    host = make_host(tmp_path)
    target = host.home / ".jupyter"
    with ServerProcess(host, tmp_path / "server.log") as server:
        first = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        before = sorted(os.listdir(target))
        planted = json.loads(server.execute(first, f"TARGET = {str(target)!r}\n" + PLANT))
        assert planted["rename"] is None and planted["symlink"] is None, planted
        later = server.ok("start", name=SANDBOXED, cwd=str(host.home / "notebooks"))["id"]
        userbase = server.execute(later, "import os; print(os.environ['PYTHONUSERBASE'])")
        log = server.log()
    assert sorted(os.listdir(target)) == before, "the server created a directory through it"
    python = Path(planted["state"]) / "python"
    assert python.is_dir() and not python.is_symlink()
    assert userbase.strip() == str(python / planted["name"])
    assert "replaced this state directory by a symlink" in log
