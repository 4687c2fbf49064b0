"""A sandboxed kernelspec never starts a kernel outside a sandbox, whichever client runs it.

Clients that ignore kernel provisioners run the kernelspec's argv as it is:
these tests do what such a raw client does (substitute the placeholders,
start the argv, talk to the kernel through the connection file) and check
that the kernel answering is sandboxed with its kernelspec's limits, or that
the launch fails saying why and no kernel runs. Under namespace-provisioner
the same argv must give exactly one sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from nsprovisioner import SandboxSpec
from nsprovisioner.cgroupfs import CgroupHost
from nsprovisioner.cli import main as cli_main
from nsprovisioner.kernel_launcher import MODULE, kernel_argv, wrap_argv

from .conftest import INTERRUPTIBLE, require_limit, run, stop_process

pytestmark = pytest.mark.timeout(120)

SHIPPED_SPEC = Path(__file__).parent.parent / "share/jupyter/kernels/python3-sandboxed"
PIDS_LIMIT = 64
READY_TIMEOUT = 30
# what the kernel reports about itself
WHO_AM_I = ("import json, os; print(json.dumps({'ns': {n: os.readlink(f'/proc/self/ns/{n}') "
            "for n in ('pid', 'user', 'net')}, 'pid': os.getpid(), 'env': sorted(os.environ)}))")



def printed_go(msg: dict[str, Any], msg_id: str) -> bool:
    """Whether `msg` is INTERRUPTIBLE's "sleeping": its cell runs, a SIGINT now interrupts it.

    Not any stream message: the kernel may write to stderr before the cell runs
    (IPython's history thread does, for one), and a SIGINT that lands in ipykernel's
    own code before the cell runs is swallowed there, with no execute_reply."""
    return (msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id
            and msg["content"]["name"] == "stdout" and "sleeping" in msg["content"]["text"])


@pytest.fixture
def pids_controller() -> None:
    """The limit these tests read back needs the pids controller (CI delegates it)."""
    require_limit(SandboxSpec(pids_limit=PIDS_LIMIT), "pids")


def set_config(spec_dir: Path, config: dict[str, Any]) -> None:
    path = spec_dir / "kernel.json"
    spec = json.loads(path.read_text())
    spec["metadata"]["kernel_provisioner"]["config"] = config
    path.write_text(json.dumps(spec))


@pytest.fixture
def kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped kernelspec, with a pids limit in its config, on JUPYTER_PATH."""
    kernels = tmp_path / "jupyter" / "kernels"
    shutil.copytree(SHIPPED_SPEC, kernels / "python3-sandboxed")
    set_config(kernels / "python3-sandboxed", {"pids_limit": PIDS_LIMIT})
    monkeypatch.setenv("JUPYTER_PATH", str(kernels.parent))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "runtime").mkdir()
    return kernels


def installed_spec(kernels: Path) -> Path:
    """`jupyter nsprovisioner install` of a plain ipykernel kernelspec, with a pids limit."""
    src = kernels / "plain"
    src.mkdir()
    (src / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Plain", "language": "python", "interrupt_mode": "signal"}))
    assert cli_main(["install", "--from", "plain", "--name", "plain-sandboxed",
                     "--prefix", str(kernels.parent.parent / "prefix"),
                     "--config", f"pids_limit={PIDS_LIMIT}"]) == 0
    return kernels.parent.parent / "prefix" / "share" / "jupyter" / "kernels" / "plain-sandboxed"


def raw_argv(spec_dir: Path, connection_file: str, *, resource_dir: bool = True) -> list[str]:
    """The argv as a client without provisioners makes it: placeholders substituted,
    a bare `python` replaced by the client's interpreter (as VS Code does)."""
    argv: list[str] = json.loads((spec_dir / "kernel.json").read_text())["argv"]
    argv = [a.replace("{connection_file}", connection_file) for a in argv]
    if resource_dir:
        argv = [a.replace("{resource_dir}", str(spec_dir)) for a in argv]
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


@contextmanager
def direct_launch(argv: list[str], connection_file: str) -> Iterator[
        tuple[subprocess.Popen[bytes], BlockingKernelClient]]:
    """The launcher started as a raw client starts a kernel, and a client on its file."""
    proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    # no heartbeat: a manager-less client takes a slow start (a loaded machine)
    # for a dead kernel when the heartbeat misses its first beats
    kc.start_channels(hb=False)
    try:
        yield proc, kc
    finally:
        kc.stop_channels()
        stop_process(proc, 15)


def execute(kc: BlockingKernelClient, code: str) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(code, timeout=15, output_hook=lambda m: out.append(
        m["content"].get("text", "")))
    assert reply["content"]["status"] == "ok", out
    return "".join(out)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, seen from here."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def cgroup_dirs(pid: int) -> dict[str, str]:
    """The cgroup directories of `pid`, one per hierarchy ("id:controllers" -> path)."""
    host = CgroupHost.detect()
    dirs = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0":
            hierarchy = host.v2
        else:
            wanted = set(controllers.split(","))
            hierarchy = next((h for h in host.v1 if h.controllers & wanted), None)
        directory = hierarchy.directory(path) if hierarchy is not None else None
        if directory is not None:
            dirs[f"{number}:{controllers}"] = directory
    return dirs


def own_ns(name: str) -> str:
    return os.readlink(f"/proc/self/ns/{name}")


@pytest.mark.parametrize("which", ["shipped", "installed"])
def test_direct_launch_runs_the_kernel_in_its_sandbox_with_its_limits(
        which: str, kernels: Path, tmp_path: Path, pids_controller: None) -> None:
    spec_dir = kernels / "python3-sandboxed" if which == "shipped" else installed_spec(kernels)
    connection_file, _ = write_connection_file(str(tmp_path / "runtime" / "kernel-1.json"),
                                               ip="127.0.0.1")
    (tmp_path / "runtime" / "kernel-other.json").write_text("{}")  # another kernel's
    with direct_launch(raw_argv(spec_dir, connection_file), connection_file) as (proc, kc):
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        inside = json.loads(execute(kc, WHO_AM_I))
        seen = execute(kc, f"import os; print([os.path.exists(f) for f in ({connection_file!r}, "
                           f"{str(tmp_path / 'runtime' / 'kernel-other.json')!r})])")
        assert seen == "[True, False]\n", "its own connection file only"
        assert inside["ns"]["pid"] != own_ns("pid") and inside["ns"]["user"] != own_ns("user")
        assert inside["pid"] == 2, "the kernel is the child of the sandbox's init"
        assert "JPY_PARENT_PID" in inside["env"] and "PYTEST_CURRENT_TEST" not in inside["env"]

        # From outside: the launcher's only child is the init, the init's the kernel.
        [init] = children(proc.pid)
        [kernel] = children(init)
        assert cmdline(init)[0].startswith("nsinit")
        assert "ipykernel_launcher" in cmdline(kernel) and MODULE not in cmdline(kernel)
        mine = cgroup_dirs(os.getpid())
        sandbox = {k: d for k, d in cgroup_dirs(kernel).items() if mine.get(k) != d}
        limits = [Path(d, "pids.max").read_text().strip() for d in sandbox.values()
                  if Path(d, "pids.max").exists()]
        assert limits == [str(PIDS_LIMIT)]

        # interrupt_mode "signal": the client's SIGINT goes to the launcher
        msg_id = kc.execute(INTERRUPTIBLE)
        while not printed_go(kc.get_iopub_msg(timeout=10), msg_id):
            pass  # until the cell runs: a SIGINT before that may not reach it
        os.kill(proc.pid, signal.SIGINT)
        reply = kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:  # a queued kernel_info reply
            reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"

        # SIGTERM, as a client ends a kernel: the kernel's status, and nothing left
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM
        assert not any(os.path.exists(f"/proc/{pid}") for pid in (init, kernel))
        assert sandbox and not any(os.path.isdir(d) for d in sandbox.values())


def test_vs_code_style_launch_without_a_connection_file_is_sandboxed(
        kernels: Path, tmp_path: Path) -> None:
    """VS Code starts a Python kernelspec with its interpreter, drops `-f {connection_file}`
    and appends the connection as flags, writing no file (vscode-jupyter kernelProcess)."""
    spec_dir = kernels / "python3-sandboxed"
    connection_file, info = write_connection_file(str(tmp_path / "runtime" / "kernel-6.json"),
                                                  ip="127.0.0.1")
    argv = raw_argv(spec_dir, "{connection_file}")
    del argv[argv.index("-f"):argv.index("-f") + 2]
    argv += [f"--ip={info['ip']}", f"--stdin={info['stdin_port']}",
             f"--control={info['control_port']}", f"--hb={info['hb_port']}",
             f'--Session.signature_scheme="{info["signature_scheme"]}"',
             f'--Session.key=b"{info["key"]}"', f"--shell={info['shell_port']}",
             '--transport="tcp"', f"--iopub={info['iopub_port']}",
             f"--f={tmp_path / 'runtime' / 'kernel-v2-1.json'}"]
    with direct_launch(argv, connection_file) as (_, kc):
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        inside = json.loads(execute(kc, WHO_AM_I))
        assert inside["ns"]["pid"] != own_ns("pid") and inside["ns"]["user"] != own_ns("user")


@pytest.mark.parametrize("config", [{}, {"network": "none"}])
def test_under_the_provisioner_the_argv_gives_one_sandbox(kernels: Path,
                                                          config: dict[str, Any]) -> None:
    """The provisioner strips the launcher prefix: one init, the kernel its only child;
    interrupt and the ipc transport (network none) work as with a plain argv."""
    set_config(kernels / "python3-sandboxed", config)

    async def main() -> None:
        km = AsyncKernelManager(kernel_name="python3-sandboxed",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            assert km.transport == "ipc"  # every sandboxed kernel (docs/security.md)
            init = km.provisioner.sandbox_pid  # type: ignore[union-attr]
            assert init in children(os.getpid())
            [kernel] = children(init)
            assert cmdline(init)[0].startswith("nsinit")
            assert cmdline(kernel)[1:3] == ["-m", "ipykernel_launcher"]
            assert not any(cmdline(p)[0].startswith("nsinit") for p in children(kernel))
            assert not any(MODULE in cmdline(p) for p in children(os.getpid()))

            msg_id = kc.execute(INTERRUPTIBLE)
            while not printed_go(await kc.get_iopub_msg(timeout=10), msg_id):
                pass
            await km.interrupt_kernel()
            # (wait_for_ready may have left a kernel_info reply queued first)
            reply = await kc.get_shell_msg(timeout=10)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = await kc.get_shell_msg(timeout=10)
            assert reply["content"]["ename"] == "KeyboardInterrupt"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
    run(main())


def test_network_none_over_tcp_fails_saying_which_client_to_use(
        kernels: Path, tmp_path: Path) -> None:
    spec_dir = kernels / "python3-sandboxed"
    set_config(spec_dir, {"network": "none"})
    connection_file, _ = write_connection_file(str(tmp_path / "runtime" / "kernel-2.json"),
                                               ip="127.0.0.1")
    done = subprocess.run(raw_argv(spec_dir, connection_file), check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 125
    assert "the kernel was not started" in done.stderr
    assert "network 'none'" in done.stderr and "ipc transport" in done.stderr
    assert "jupyter_client >= 7" in done.stderr
    assert children(os.getpid()) == []


def test_network_none_over_ipc_works(kernels: Path, tmp_path: Path) -> None:
    spec_dir = kernels / "python3-sandboxed"
    set_config(spec_dir, {"network": "none"})
    (tmp_path / "sockets").mkdir()
    connection_file, _ = write_connection_file(str(tmp_path / "runtime" / "kernel-3.json"),
                                               transport="ipc",
                                               ip=str(tmp_path / "sockets" / "k"))
    with direct_launch(raw_argv(spec_dir, connection_file), connection_file) as (proc, kc):
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        inside = json.loads(execute(kc, WHO_AM_I))
        assert inside["ns"]["net"] != own_ns("net") and inside["ns"]["pid"] != own_ns("pid")
        proc.terminate()
        assert proc.wait(15) == 128 + signal.SIGTERM


def test_without_resource_dir_the_kernelspec_is_found_by_name(
        kernels: Path, tmp_path: Path) -> None:
    """Some clients substitute only {connection_file}: --kernel-name finds the kernelspec
    on Jupyter's path, and one that isn't there is refused."""
    spec_dir = kernels / "python3-sandboxed"
    connection_file, _ = write_connection_file(str(tmp_path / "runtime" / "kernel-4.json"),
                                               ip="127.0.0.1")
    argv = raw_argv(spec_dir, connection_file, resource_dir=False)
    assert "{resource_dir}" in argv
    with direct_launch(argv, connection_file) as (_, kc):
        kc.wait_for_ready(timeout=READY_TIMEOUT)
        assert json.loads(execute(kc, WHO_AM_I))["ns"]["pid"] != own_ns("pid")

    argv[argv.index("python3-sandboxed")] = "not-installed"
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert "no kernelspec named 'not-installed'" in done.stderr
    assert children(os.getpid()) == []


def test_a_bad_option_in_the_kernelspec_refuses_the_direct_launch(
        kernels: Path, tmp_path: Path) -> None:
    spec_dir = kernels / "python3-sandboxed"
    set_config(spec_dir, {"memroy_limit": "1G"})
    connection_file, _ = write_connection_file(str(tmp_path / "runtime" / "kernel-5.json"))
    done = subprocess.run(raw_argv(spec_dir, connection_file), check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 125
    assert "did you mean 'memory_limit'" in done.stderr and str(spec_dir) in done.stderr


def test_kernel_argv_recognises_exactly_the_launcher_prefix() -> None:
    kernel = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    wrapped = wrap_argv(kernel, "k", "/venv/bin/python")
    assert kernel_argv(wrapped) == ["/venv/bin/python", *kernel[1:]]
    assert kernel_argv(wrap_argv(kernel, "k")) == kernel
    assert kernel_argv(kernel) == kernel
    rewrapped = wrap_argv(wrapped, "other", "/py")
    assert rewrapped.count(MODULE) == 1 and kernel_argv(rewrapped) == kernel_argv(wrapped)
    for not_ours in (wrapped[:-len(kernel) - 1],  # no --
                     [*wrapped[:3], "--unknown", "x", *wrapped[3:]],
                     ["python", "-m", "other_launcher", *wrapped[3:]]):
        assert kernel_argv(not_ours) == not_ours


def test_install_from_a_wrapped_kernelspec_does_not_wrap_twice(kernels: Path) -> None:
    assert cli_main(["install", "--from", "python3-sandboxed", "--name", "again",
                     "--prefix", str(kernels.parent.parent / "prefix")]) == 0
    path = kernels.parent.parent / "prefix/share/jupyter/kernels/again/kernel.json"
    argv = json.loads(path.read_text())["argv"]
    assert argv.count(MODULE) == 1 and argv.count("--") == 1
    assert argv[argv.index("--kernel-name") + 1] == "again"
    assert kernel_argv(argv) == [sys.executable, "-m", "ipykernel_launcher", "-f",
                                 "{connection_file}"]


MISSING_PROVISIONER = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
print(json.dumps(sorted(ksm.get_all_specs())), flush=True)
try:
    ksm.get_kernel_spec("python3-sandboxed")
except NoSuchKernel as e:
    print("NoSuchKernel:", e, flush=True)
"""


def test_a_server_without_the_provisioner_refuses_the_kernelspec(
        kernels: Path, tmp_path: Path) -> None:
    """jupyter_client in an environment without nsprovisioner: the kernelspec is not
    offered, and asking for it fails, naming the missing provisioner."""
    site = next(p for p in sys.path if p.endswith("site-packages") and
                Path(p, "jupyter_client").is_dir())
    without = tmp_path / "site-without-nsprovisioner"
    without.mkdir()
    for entry in os.listdir(site):
        if not entry.lower().startswith("nsprovisioner"):
            (without / entry).symlink_to(Path(site, entry))
    done = subprocess.run([sys.executable, "-S", "-c", MISSING_PROVISIONER, str(kernels)],
                          env={**os.environ, "PYTHONPATH": str(without)}, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    offered, refused = done.stdout.splitlines()
    assert "python3-sandboxed" not in json.loads(offered)
    assert refused == "NoSuchKernel: No such kernel named python3-sandboxed"
    assert ("referencing a kernel provisioner ('namespace-provisioner') that is not available"
            in done.stderr)
