"""The init on its own: exit statuses, signal forwarding, reaping; under valgrind.

nsinit is an ordinary program, so unlike the clone stages it can run under
valgrind outside a sandbox; the sandbox tests (test_spawn.py) cover it as PID 1.
The installed init is linked statically (it is exec'd at every start), and
valgrind can't follow a static glibc (it reports glibc's own start-up as
uninitialised reads), so these tests build the same source dynamically.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nsprovisioner.initexe import INIT_PATH

VALGRIND = ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full",
            "--errors-for-leak-kinds=definite"]
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "nsinit.c"


@pytest.fixture(scope="session")
def dynamic_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SOURCE.exists():
        pytest.fail(f"{SOURCE} is missing: run the tests from a checkout (scripts/test-all.sh "
                    "copies csrc next to tests)")
    out = tmp_path_factory.mktemp("nsinit") / "nsinit"
    subprocess.run(["gcc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11",
                    f"-I{SOURCE.parent}", "-o", str(out), str(SOURCE)], check=True)
    return out


@pytest.fixture
def valgrind(dynamic_init: Path) -> list[str]:
    if shutil.which("valgrind") is None:
        pytest.fail("valgrind is needed (Debian package valgrind; scripts/setup-host.sh installs it)")
    return [*VALGRIND, str(dynamic_init)]


def nsinit(*command: str, valgrind: list[str] | None = None) -> list[str]:
    """The installed (static) init, or the dynamic build under valgrind."""
    return [*(valgrind or [str(INIT_PATH)]), "--", *command]


@pytest.mark.parametrize("script, code", [
    ("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 128 + 15), ("kill -KILL $$", 128 + 9),
])
def test_exit_status_under_valgrind(script: str, code: int, valgrind: list[str]) -> None:
    result = subprocess.run(nsinit("sh", "-c", script, valgrind=valgrind),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == code, result.stderr


@pytest.mark.parametrize("command, code", [(["no-such-command"], 127), (["/etc/passwd"], 126)])
def test_exec_failure_codes_under_valgrind(command: list[str], code: int, valgrind: list[str]) -> None:
    result = subprocess.run(nsinit(*command, valgrind=valgrind), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == code
    assert "nsinit: exec" in result.stderr


def test_signals_are_forwarded_under_valgrind(valgrind: list[str]) -> None:
    proc = subprocess.Popen(
        nsinit("sh", "-c", "trap 'exit 9' USR1; echo ready; while :; do sleep 0.05; done",
               valgrind=valgrind), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(60) == 9
    finally:
        proc.kill()
        proc.wait()


def test_usage_error() -> None:
    result = subprocess.run([str(INIT_PATH)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_jpy_parent_pid_names_the_init() -> None:
    """The server's pid would make ipykernel's parent poller shut the kernel down."""
    result = subprocess.run(nsinit("sh", "-c", "echo ${JPY_PARENT_PID:-unset}"),
                            capture_output=True, text=True, check=False,
                            env={"JPY_PARENT_PID": "1234", "PATH": "/usr/bin:/bin"})
    assert result.stdout == "1\n"
    result = subprocess.run(nsinit("sh", "-c", "echo ${JPY_PARENT_PID:-unset}"),
                            capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.stdout == "unset\n"


def test_returns_when_the_command_exits_even_with_orphans_running() -> None:
    t0 = time.monotonic()
    result = subprocess.run(nsinit("sh", "-c", "sleep 30.0123 & exit 4"), timeout=20, check=False,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert result.returncode == 4
    assert time.monotonic() - t0 < 10
    subprocess.run(["pkill", "-f", "^sleep 30.0123$"], check=False)  # an orphan outside a pid ns
