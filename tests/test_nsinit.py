"""The helper (nsinit: Child, GrandChild and init) under valgrind, as a whole.

The helper is an ordinary program, so valgrind can follow it through real
sandbox starts: the Parent execs valgrind with a dynamic build of the same
sources (valgrind can't follow the installed static glibc; it reports glibc's
own start-up as uninitialised reads). valgrind 3.19 (Debian 12) knows neither
mount_setattr nor open_tree, so these starts use the default mount table
without its attribute and no-symlink bind entries; scripts/asan-test.sh runs
the full table under ASan and UBSan. Every process's report goes to one log,
which must stay empty.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsprovisioner import PIPE, SandboxError, SandboxSpec, spawn
from nsprovisioner.initexe import INIT_PATH
from nsprovisioner.mounts import MountOp

from .conftest import run
from .test_csrc import HELPER_SOURCES

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = HELPER_SOURCES  # the whole helper, as setup.py builds it
SUPPRESSIONS = Path(__file__).resolve().parent / "valgrind.supp"
VALGRIND_UNKNOWN_OPS = {2, 8}  # NSX_MNT_SETATTR, NSX_MNT_BIND


@pytest.fixture(scope="session")
def dynamic_helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CSRC.exists():
        pytest.fail(f"{CSRC} is missing: run the tests from a checkout (scripts/test-all.sh "
                    "copies csrc next to tests)")
    out = tmp_path_factory.mktemp("nsinit") / "nsinit"
    subprocess.run(["gcc", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                    f"-I{CSRC}", "-o", str(out), *(str(CSRC / s) for s in SOURCES)],
                   check=True)
    out.parent.chmod(0o755)  # sandboxes mapped to other uids exec it
    return out


def valgrind_command(log: Path) -> list[str]:
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is needed (Debian package valgrind; scripts/setup-host.sh "
                    "installs it)")
    # one log without %p: forks keep appending to the file opened at start,
    # before the sandbox's mount table hides the path
    return ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full",
            "--errors-for-leak-kinds=definite", "--trace-children=no", "--vgdb=no",
            f"--suppressions={SUPPRESSIONS}", f"--log-file={log}"]


@pytest.fixture
def under_valgrind(dynamic_helper: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """spawn() runs the helper under valgrind; yields the log, checked empty after."""
    spawn_module = sys.modules["nsprovisioner.spawn"]
    log = tmp_path / "valgrind.log"
    command = valgrind_command(log)
    valgrind = shutil.which("valgrind")
    assert valgrind is not None
    monkeypatch.setattr(spawn_module, "helper_command",
                        lambda: (-1, valgrind, [*command, str(dynamic_helper)]))
    plan_mounts = spawn_module.plan_mounts

    def known_to_valgrind(spec: SandboxSpec, cwd: str, **kwargs: object) -> list[MountOp]:
        return [m for m in plan_mounts(spec, cwd, **kwargs)
                if m.op not in VALGRIND_UNKNOWN_OPS]

    monkeypatch.setattr(spawn_module, "plan_mounts", known_to_valgrind)
    with_cgroup_view = spawn_module.with_cgroup_view
    monkeypatch.setattr(spawn_module, "with_cgroup_view", lambda *args: [
        m for m in with_cgroup_view(*args) if m.op not in VALGRIND_UNKNOWN_OPS])
    yield log
    report = log.read_text() if log.exists() else ""
    assert report == "", report


async def status_of(spec: SandboxSpec, argv: list[str], **kwargs: object) -> int:
    proc = await spawn(spec, argv, **kwargs)  # type: ignore[arg-type]
    return await proc.wait()


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("script, code", [("exit 0", 0), ("exit 3", 3),
                                          ("kill -TERM $$", 128 + 15)])
def test_sandbox_starts_under_valgrind(init: bool, script: str, code: int,
                                       under_valgrind: Path) -> None:
    if not init and script.startswith("kill"):
        code = 0  # PID 1 ignores signals it has no handler for
    assert run(status_of(SandboxSpec(init=init), ["sh", "-c", script])) == code


@pytest.mark.parametrize("init", [True, False])
def test_exec_failure_under_valgrind(init: bool, under_valgrind: Path) -> None:
    with pytest.raises(SandboxError, match="not found"):
        run(status_of(SandboxSpec(init=init), ["no-such-command-here"]))


@pytest.mark.parametrize("step", ["unshare_user", "wait_usermap_ack", "clone_grandchild",
                                  "send_recvpid_pls", "set_ids", "mount", "fds", "seccomp",
                                  "init_fork", "init_exec"])
def test_failing_steps_under_valgrind(step: str, under_valgrind: Path) -> None:
    with pytest.raises(SandboxError, match=step):
        run(status_of(SandboxSpec(), ["/bin/true"], _fault_step=step))


def test_signals_are_forwarded_under_valgrind(under_valgrind: Path) -> None:
    async def main() -> int:
        script = "trap 'exit 9' USR1; echo ready; while :; do sleep 0.05; done"
        proc = await spawn(SandboxSpec(), ["sh", "-c", script], stdout=PIPE)
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, proc.stdout.readline) == b"ready\n"
        proc.send_signal(signal.SIGUSR1)
        code = await proc.wait()
        proc.close_pipes()
        return code
    assert run(main()) == 9


def nsinit(*command: str) -> list[str]:
    """The installed helper as a plain init, without a sandbox."""
    return [str(INIT_PATH), "--", *command]


def test_usage_error() -> None:
    result = subprocess.run([str(INIT_PATH)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr


@pytest.mark.parametrize("command, code", [(["no-such-command"], 127), (["/etc/passwd"], 126)])
def test_exec_failure_codes_without_a_sandbox(command: list[str], code: int) -> None:
    result = subprocess.run(nsinit(*command), capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == code
    assert "nsinit: exec" in result.stderr


def test_returns_when_the_command_exits_even_with_orphans_running() -> None:
    t0 = time.monotonic()
    result = subprocess.run(nsinit("sh", "-c", "sleep 30.0123 & exit 4"), timeout=20, check=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert result.returncode == 4
    assert time.monotonic() - t0 < 10
    subprocess.run(["pkill", "-f", "^sleep 30.0123$"], check=False)  # an orphan outside a pid ns
