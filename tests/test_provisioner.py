"""NamespaceProvisioner keeps LocalProvisioner's lifecycle, with real ipykernels.

Most tests run once with each provisioner: what holds for a plain local
kernel must hold in the sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager, _ShutdownStatus
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from traitlets.config import Config

from nsprovisioner import SandboxError
from nsprovisioner.provisioner import NamespaceProvisioner

from .conftest import SLOWDOWN, run

pytestmark = pytest.mark.timeout(120 * SLOWDOWN)

SHIPPED_SPEC = Path(__file__).parent.parent / "share/jupyter/kernels/python3-sandboxed"
PROVISIONERS = ["local", "namespace", "nonet", "egress"]
# name -> (provisioner, its config): "nonet" is the sandbox with network "none",
# which talks to Jupyter over ipc sockets instead of loopback tcp; "egress" the
# one with pasta beside it (no_leaks: no pasta outlives its kernel)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "local": ("local", {}), "namespace": ("namespace", {}),
    "nonet": ("namespace", {"network": "none"}),
    "egress": ("namespace", {"network": "egress"}),
}
READY_TIMEOUT = 30 * SLOWDOWN


def write_kernelspec(kernels: Path, name: str, *, provisioner: str, interrupt_mode: str = "signal",
                     config: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                     argv: list[str] | None = None) -> None:
    spec: dict[str, Any] = {
        "argv": argv or [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python", "interrupt_mode": interrupt_mode,
        "env": env or {},
        "metadata": {"kernel_provisioner": {"provisioner_name": f"{provisioner}-provisioner",
                                            "config": config or {}}},
    }
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    """A kernelspec dir with one plain and one sandboxed kernel per interrupt mode."""
    kernels = tmp_path / "kernels"
    for name in PROVISIONERS:
        provisioner, config = VARIANTS[name]
        write_kernelspec(kernels, name, provisioner=provisioner, config=config)
        write_kernelspec(kernels, f"{name}-message", provisioner=provisioner,
                         interrupt_mode="message", config=config)
    (tmp_path / "runtime").mkdir()
    (tmp_path / "work").mkdir()
    return kernels


def manager(kernels: Path, name: str, cls: type[AsyncKernelManager] = AsyncKernelManager,
            **kw: Any) -> AsyncKernelManager:
    runtime = kernels.parent / "runtime"
    return cls(kernel_name=name,
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
                              connection_file=str(runtime / f"kernel-{uuid.uuid4()}.json"), **kw)


@asynccontextmanager
async def started(km: AsyncKernelManager) -> AsyncIterator[Any]:
    """A started kernel and a ready client; the kernel is gone afterwards."""
    await km.start_kernel(cwd=str(Path(km.connection_file).parent.parent / "work"))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        yield kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        else:  # ended by the test: still close the manager's sockets and files
            await km.cleanup_resources()


async def execute(kc: Any, code: str, timeout: float = 10) -> tuple[str, str]:
    """(status, stdout) of running `code` in the kernel."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append(msg["content"]["ename"])

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"]["status"], "".join(out)


async def reply_to(kc: Any, msg_id: str) -> dict[str, Any]:
    """The shell reply to `msg_id`, skipping wait_for_ready's late kernel_info replies."""
    while True:
        reply: dict[str, Any] = await kc.get_shell_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def host_pidns() -> str:
    return os.readlink("/proc/self/ns/pid")


def kernel_process(km: AsyncKernelManager) -> Any:
    """The object whose returncode tells how the kernel ended."""
    prov = km.provisioner
    return prov.sandbox if isinstance(prov, NamespaceProvisioner) else prov.process


async def until_restarted(km: AsyncKernelManager, old: Any) -> None:
    """The restarter's "restart" callbacks run before it restarts the kernel: until
    the new kernel's process exists, the manager has none alive, and a client's
    wait_for_ready() fails with "Kernel died before replying to kernel_info"."""
    deadline = time.monotonic() + READY_TIMEOUT
    while (km.provisioner is None or kernel_process(km) in (None, old)
           or not await km.is_alive()):
        assert time.monotonic() < deadline, "the restarter did not start a new kernel"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_kernel_starts_and_runs_code(kernels: Path, provisioner: str, no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km) as kc:
            assert await km.is_alive()
            status, out = await execute(
                kc, "import os; print(os.readlink('/proc/self/ns/pid'), "
                "open('/proc/1/cmdline').read().split(chr(0))[0], os.getcwd())")
            assert status == "ok"
            pidns, pid1, cwd = out.split()
            assert cwd == str((kernels.parent / "work").resolve())
            if provisioner != "local":
                assert pidns != host_pidns()
                assert pid1 == "nsinit"  # and ipykernel did not exit over JPY_PARENT_PID
            else:
                assert pidns == host_pidns()
        assert not await km.is_alive()
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_signal_interrupt_reaches_the_kernels_children(kernels: Path, provisioner: str,
                                                       no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km) as kc:
            msg_id = kc.execute("import os; print('sleeping', flush=True); os.system('sleep 30')")
            while True:  # wait until the shell runs
                msg = await kc.get_iopub_msg(timeout=10)
                if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                    break
            await asyncio.sleep(0.3)
            begin = time.monotonic()
            await km.interrupt_kernel()
            reply = await reply_to(kc, msg_id)
            assert reply["content"]["status"] == "ok"  # os.system returned, nothing raised
            assert time.monotonic() - begin < 5, "sleep 30 did not get SIGINT"
            assert await km.is_alive()
            assert (await execute(kc, "print(6 * 7)"))[1].strip() == "42"
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_message_interrupt_raises_keyboardinterrupt(kernels: Path, provisioner: str,
                                                    no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, f"{provisioner}-message")
        async with started(km) as kc:
            msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(30)")
            while True:
                msg = await kc.get_iopub_msg(timeout=10)
                if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                    break
            # ipykernel now and then drops a message-mode interrupt that arrives
            # as the cell starts (seen with LocalProvisioner too); a user presses
            # interrupt again, and so does this test, twice at most
            for attempt in range(3):
                await km.interrupt_kernel()
                try:
                    reply = await asyncio.wait_for(reply_to(kc, msg_id), 5)
                    break
                except (asyncio.TimeoutError, queue.Empty):
                    assert attempt < 2, "three interrupt_requests went unanswered"
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert await km.is_alive()
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_restart_gives_a_fresh_kernel(kernels: Path, provisioner: str, no_leaks: None) -> None:
    code = "import os; print(os.readlink('/proc/self/ns/pid'))"

    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km) as kc:
            prov = km.provisioner
            before = (await execute(kc, code))[1].strip()
            await execute(kc, "import builtins; builtins.nsprov_marker = 1")
            init_before = getattr(prov, "sandbox_pid", None)
            await km.restart_kernel()
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            after = (await execute(kc, code))[1].strip()
            marker = (await execute(kc, "import builtins; "
                                        "print(hasattr(builtins, 'nsprov_marker'))"))[1]
            assert marker.strip() == "False"  # a new kernel process
            assert km.provisioner is prov
            assert km._shutdown_status == _ShutdownStatus.ShutdownRequest
            if provisioner != "local":
                # a new sandbox: a new init, in its own pid namespace. (Its inode
                # number may equal the old one's: Linux reuses freed ns numbers.)
                assert prov.sandbox_pid != init_before
                assert host_pidns() not in (before, after)
            else:
                assert before == after == host_pidns()
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_graceful_shutdown_is_not_a_kill(kernels: Path, provisioner: str,
                                         no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        # jupyter_client sends SIGTERM after half of shutdown_wait_time (2.5 s by
        # default): a kernel slowed by other jobs on the machine would be
        # "killed" by the client, not by us. What is tested: no signal at all.
        km.shutdown_wait_time = 30.0 * SLOWDOWN
        async with started(km):
            process = kernel_process(km)
            begin = time.monotonic()
            await km.shutdown_kernel()
            print(f"graceful shutdown took {time.monotonic() - begin:.2f} s")
            assert km._shutdown_status == _ShutdownStatus.ShutdownRequest
            assert process.returncode == 0
            assert not km.has_kernel
            assert not Path(km.connection_file).exists()
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_sigterm_reaches_the_kernel(kernels: Path, provisioner: str, no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km) as kc:
            await execute(kc, "import os, signal\n"
                          "signal.signal(signal.SIGTERM, lambda *_: os._exit(7))")
            process = kernel_process(km)
            await km.provisioner.terminate()
            await asyncio.wait_for(km.provisioner.wait(), 10)
            assert process.returncode == 7  # the kernel's own status, through the init
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_forced_shutdown_kills_at_once(kernels: Path, provisioner: str, no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km) as kc:
            await execute(kc, "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
            process = kernel_process(km)
            begin = time.monotonic()
            await km.shutdown_kernel(now=True)
            assert time.monotonic() - begin < 3
            assert process.returncode == -signal.SIGKILL
    run(main())


def test_forced_shutdown_leaves_nothing_running_in_the_sandbox(kernels: Path,
                                                               no_leaks: None) -> None:
    marker = f"{uuid.uuid4().int % 10**6}.5"

    async def main() -> None:
        km = manager(kernels, "namespace")
        async with started(km) as kc:
            # a daemon in its own session: LocalProvisioner's killpg would miss it
            await execute(kc, f"import subprocess; subprocess.Popen(['sleep', '{marker}'], "
                          "start_new_session=True)")
            assert any(marker in p for p in cmdlines())
            await km.shutdown_kernel(now=True)
        assert not any(marker in p for p in cmdlines())
    run(main())


def cmdlines() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return found


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_restarter_restarts_a_kernel_killed_from_outside(kernels: Path, provisioner: str,
                                                         no_leaks: None) -> None:
    async def main() -> None:
        # the IOLoop manager runs the restarter, as in jupyter_server
        km = manager(kernels, provisioner, AsyncIOLoopKernelManager,
                     config=Config({"KernelRestarter": {"time_to_dead": 0.2}}))
        restarted = asyncio.Event()
        async with started(km) as kc:
            km.add_restart_callback(restarted.set, "restart")  # needs the running restarter
            old = kernel_process(km)
            os.kill(old.pid, signal.SIGKILL)
            await asyncio.wait_for(restarted.wait(), 20)
            await until_restarted(km, old)
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            assert kernel_process(km).pid != old.pid
            assert (await execute(kc, "print('back')"))[1].strip() == "back"
    run(main())


@pytest.mark.parametrize("provisioner", PROVISIONERS)
def test_provisioner_info_round_trip(kernels: Path, provisioner: str, no_leaks: None) -> None:
    async def main() -> None:
        km = manager(kernels, provisioner)
        async with started(km):
            info = await km.provisioner.get_provisioner_info()
            assert json.loads(json.dumps(info, default=str))["kernel_id"] == km.kernel_id
            assert info["pid"] == kernel_process(km).pid
            fresh = type(km.provisioner)(kernel_id="other", kernel_spec=km.kernel_spec)
            await fresh.load_provisioner_info(info)
            assert fresh.kernel_id == km.kernel_id
            assert fresh.connection_info == km.provisioner.connection_info
            # a live sandbox adds its cgroup's usage and its settings; the rest round-trips
            usage = info.pop("cgroup_usage", {})
            assert isinstance(usage, dict)
            sandbox = info.pop("sandbox", None)
            if isinstance(km.provisioner, NamespaceProvisioner):
                assert sandbox is not None and sandbox["network"] == km.provisioner.spec.network
            assert info == await fresh.get_provisioner_info()
    run(main())


SECRETS = {"JUPYTER_TOKEN": "t0ken", "JUPYTERHUB_API_TOKEN": "hub", "JPY_API_TOKEN": "jpy",
           "SSH_AUTH_SOCK": "/tmp/agent", "AWS_SECRET_ACCESS_KEY": "aws"}


def test_server_secrets_stay_out_of_the_kernel(kernels: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_leaks: None) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_TIME", "C")
    write_kernelspec(kernels, "with-env", provisioner="namespace",
                     env={"FROM_SPEC": "${JUPYTER_TOKEN}-x"})
    write_kernelspec(kernels, "keep-own", provisioner="namespace",
                     config={"env_keep": ["PATH", "MY_SETTING"]})
    monkeypatch.setenv("MY_SETTING", "kept")
    code = "import os, json; print(json.dumps(dict(os.environ)))"

    async def main() -> None:
        async with started(manager(kernels, "with-env")) as kc:
            env = json.loads((await execute(kc, code))[1])
        assert not set(SECRETS) & set(env)
        assert env["JPY_PARENT_PID"] == "1"  # the init, not the server
        # what the kernelspec asks for it gets, substitutions included
        assert env["FROM_SPEC"] == "t0ken-x"
        assert env["LC_TIME"] == "C" and env["PATH"] == os.environ["PATH"]
        async with started(manager(kernels, "keep-own")) as kc:
            env = json.loads((await execute(kc, code))[1])
        assert env["MY_SETTING"] == "kept"
        assert "HOME" not in env and "LC_TIME" not in env
    run(main())


def test_runtime_dir_is_hidden_but_own_connection_file_is_readable(
        kernels: Path, no_leaks: None) -> None:
    runtime = kernels.parent / "runtime"
    other = runtime / "kernel-someone-else.json"
    other.write_text('{"key": "secret"}')

    async def main() -> None:
        km = manager(kernels, "namespace")
        async with started(km) as kc:
            cf = km.connection_file
            status, out = await execute(kc, f"import os, json\nprint(os.path.exists({str(other)!r}))\n"
                                        f"print(len(json.load(open({cf!r}))['key']) > 0)\n"
                                        f"print(os.access({cf!r}, os.W_OK))")
            assert status == "ok"
            assert out.split() == ["False", "True", "False"], out
            prov = km.provisioner
            assert prov.resolve_path(str(other)) is None
            work_file = kernels.parent / "work" / "notes.txt"
            work_file.write_text("x")
            assert prov.resolve_path("notes.txt") == str(work_file.resolve())
    run(main())


def test_concurrent_launches_each_get_their_own_sandbox(kernels: Path, no_leaks: None) -> None:
    # Over ipc: with tcp, jupyter_client picks free ports and releases them
    # before its kernels bind them, so concurrent starts sometimes lose a port
    # to another socket (LocalProvisioner alike; seen in benchmarks/kernels.py).
    async def main() -> None:
        mkm = AsyncMultiKernelManager(
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
            connection_dir=str(kernels.parent / "runtime"))
        ids = await asyncio.gather(*(mkm.start_kernel(kernel_name="nonet")
                                     for _ in range(3)))
        try:
            namespaces = set()
            for kernel_id in ids:
                kc = mkm.get_kernel(kernel_id).client()
                kc.start_channels()
                try:
                    await kc.wait_for_ready(timeout=READY_TIMEOUT)
                    out = (await execute(kc, "import os; print(os.readlink('/proc/self/ns/pid'))"))
                    namespaces.add(out[1].strip())
                finally:
                    kc.stop_channels()
            assert len(namespaces) == 3
        finally:
            await mkm.shutdown_all(now=True)
            mkm.context.destroy()  # shared by its kernels' managers; shutdown_all keeps it
        assert list((kernels.parent / "runtime").iterdir()) == []
    run(main())


@pytest.mark.parametrize("config, words", [
    ({"memory": "1G"}, ["'memory'", "'1G'", "memory_limit", "'bad'"]),
    ({"pids_limit": -3}, ["pids_limit", "-3", "'bad'"]),
    ({"network": "wifi"}, ["network", "'wifi'", "'bad'"]),
])
def test_bad_option_fails_the_start_naming_key_value_and_kernelspec(
        kernels: Path, config: dict[str, Any], words: list[str], no_leaks: None) -> None:
    write_kernelspec(kernels, "bad", provisioner="namespace", config=config)

    async def main() -> None:
        km = manager(kernels, "bad")
        with pytest.raises(SandboxError) as failure:
            await km.start_kernel()
        for word in words:
            assert word in str(failure.value)
        assert not Path(km.connection_file).exists()
    run(main())


def test_jupyter_config_sets_options_and_the_kernelspec_wins(kernels: Path) -> None:
    write_kernelspec(kernels, "limited", provisioner="namespace",
                     config={"hostname": "from-kernelspec"})
    km = manager(kernels, "limited", config=Config({"NamespaceProvisioner": {
        "hostname": "from-config", "pids_limit": 64}}))

    async def main() -> None:
        await km.pre_start_kernel()
        try:
            spec = km.provisioner.spec
            assert spec.hostname == "from-kernelspec" and spec.pids_limit == 64
        finally:
            await km.provisioner._discard_launch_files()
        assert not Path(km.connection_file).exists()
    run(main())


def test_failed_sandbox_start_reports_and_removes_connection_file(
        kernels: Path, no_leaks: None) -> None:
    write_kernelspec(kernels, "broken", provisioner="namespace", config={"init": False},
                     argv=["/nonexistent/kernel", "-f", "{connection_file}"])

    async def main() -> None:
        km = manager(kernels, "broken")
        with pytest.raises(SandboxError, match="not found inside the sandbox"):
            await km.start_kernel()
        assert not km.has_kernel
        assert list((kernels.parent / "runtime").iterdir()) == []
    run(main())


def test_shipped_kernelspec_uses_the_namespace_provisioner() -> None:
    spec = json.loads((SHIPPED_SPEC / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (sandboxed)"
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "namespace-provisioner"


@pytest.mark.parametrize("provisioner", ["namespace", "nonet"])
def test_files_go_when_the_restarter_gives_up(kernels: Path, provisioner: str,
                                              no_leaks: None) -> None:
    """jupyter_server drops such a kernel without cleanup(): the provisioner cleans up."""
    _, config = VARIANTS[provisioner]
    write_kernelspec(kernels, "dies", provisioner="namespace", config=config,
                     argv=[sys.executable, "-c", "import sys; sys.exit(3)", "{connection_file}"])

    async def main() -> None:
        km = manager(kernels, "dies", AsyncIOLoopKernelManager, config=Config(
            {"KernelRestarter": {"time_to_dead": 0.1, "restart_limit": 1}}))
        gave_up = asyncio.Event()
        await km.start_kernel()
        km.add_restart_callback(gave_up.set, "dead")
        socket_dir = getattr(km.provisioner, "socket_dir", None)
        await asyncio.wait_for(gave_up.wait(), 30)
        deadline = time.monotonic() + 5
        while os.path.exists(km.connection_file) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not os.path.exists(km.connection_file)
        assert list((kernels.parent / "runtime").iterdir()) == []
        if socket_dir is not None:
            assert not os.path.exists(socket_dir)
        km.stop_restarter()
        await km.cleanup_resources()  # what a caller that keeps the manager would do
        km.context.destroy()
    run(main())


def ipc_sockets(km: AsyncKernelManager) -> list[str]:
    info = km.get_connection_info()
    assert info["transport"] == "ipc", info
    return [f"{info['ip']}-{info[key]}" for key in
            ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")]


@pytest.mark.parametrize("provisioner", ["namespace", "nonet"])
def test_a_start_returns_once_the_kernel_listens(kernels: Path, provisioner: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 no_leaks: None) -> None:
    """jupyter_server connects to a kernel as soon as its start returns; connects
    that come before the kernel binds cost JupyterLab's first output 0.5 s in a
    third of the starts (docs/benchmarks.md). A kernel that exits without listening
    doesn't hold the start until LISTEN_WAIT; one that never listens holds it that
    long (symlinks it put in its socket dir don't count), then starts as
    LocalProvisioner's would."""
    from nsprovisioner import provisioner as provisioner_module

    _, config = VARIANTS[provisioner]
    write_kernelspec(kernels, "exits", provisioner="namespace", config=config,
                     argv=[sys.executable, "-c", "import sys; sys.exit(3)", "{connection_file}"])
    # never listens; puts symlinks where its sockets would be (its socket dir is its
    # own to write): they are not sockets, and the server follows none of them
    plant = ("import json, os, sys, time; c = json.load(open(sys.argv[1]))\n"
             "for key in ('shell_port', 'iopub_port', 'stdin_port', 'control_port', 'hb_port'):\n"
             "    os.symlink('/dev/null', f\"{c['ip']}-{c[key]}\")\n"
             "time.sleep(600)")
    write_kernelspec(kernels, "deaf", provisioner="namespace", config=config,
                     argv=[sys.executable, "-c", plant, "{connection_file}"])

    async def main() -> None:
        km = manager(kernels, provisioner)
        await km.start_kernel()
        try:
            assert all(os.path.exists(p) for p in ipc_sockets(km)), ipc_sockets(km)
        finally:
            await km.shutdown_kernel(now=True)

        monkeypatch.setattr(provisioner_module, "LISTEN_WAIT", 60 * SLOWDOWN)
        km = manager(kernels, "exits")
        begin = time.monotonic()
        await km.start_kernel()
        assert time.monotonic() - begin < 30 * SLOWDOWN, "a dead kernel held its start"
        assert not await km.is_alive()
        await km.shutdown_kernel(now=True)

        monkeypatch.setattr(provisioner_module, "LISTEN_WAIT", 2.0)
        km = manager(kernels, "deaf")
        begin = time.monotonic()
        await km.start_kernel()
        try:
            assert time.monotonic() - begin >= 2.0, "symlinks passed for listening sockets"
            assert await km.is_alive()
            assert all(os.path.islink(p) for p in ipc_sockets(km))  # planted, early
        finally:
            await km.shutdown_kernel(now=True)
    run(main())
