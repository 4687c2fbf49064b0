"""Warm sandboxes (pool.py): a pooled kernel is a fresh kernel that started earlier.

Each test compares a pooled kernel with a fresh one of the same kernelspec
(the first start of a kernelspec with a pool misses it and starts fresh),
through real ipykernels; the last ones drive a real jupyter_server and kill it.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from nsprovisioner import pool as pool_module
from nsprovisioner.cli import main as cli_main
from nsprovisioner.doctor import HostFacts, check_pools
from nsprovisioner.ipcdir import sockets_parent
from nsprovisioner.pool import close_pools, waiting_on_host

from .conftest import INTERRUPTIBLE, SLOWDOWN, execute_ok, run
from .jupyter_process import start_jupyter
from .test_provisioner import READY_TIMEOUT, manager, until_restarted, write_kernelspec
from .test_server import TOKEN, request

pytestmark = pytest.mark.timeout(180 * SLOWDOWN)

POOLED = "pooled"

# What a notebook can see of its kernel's start: compared between a fresh and
# a pooled kernel. The connection file's path differs (a kernel id each).
PROBE = """
import json, os, sys, time
time.sleep(1)  # the history thread's first write done
def fd_kind(fd):
    try:
        target = os.readlink('/proc/self/fd/' + fd)
    except OSError:  # the fd of the listing
        return 'eventfd'
    return target if target.startswith(('anon_inode', '/')) else target.split(':')[0]
cf = sys.argv[sys.argv.index('-f') + 1]
def err(fn, *a):
    try:
        fn(*a)
        return None
    except OSError as e:
        return e.strerror
status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines())
print(json.dumps({
    'cwd': os.getcwd(), 'env': dict(os.environ), 'argv0': sys.argv[0],
    'cmdline': open('/proc/self/cmdline').read().replace(cf, 'CF'),
    'environ': open('/proc/self/environ').read(), 'orig_argv': [a if a != cf else 'CF' for a in sys.orig_argv],
    'argv': [a if a != cf else 'CF' for a in sys.argv[1:]],
    'connection_file': open(cf).read(), 'cf_write': err(open, cf, 'a'),
    'runtime_listing': err(os.listdir, os.path.dirname(cf)),
    'path0': sys.path[0:2], 'modules': sorted(sys.modules),
    'session': __session__ if '__session__' in globals() else None,
    # zmq's threads make eventfds as they go: two fresh kernels differ by one at times
    'fds': sorted(k for k in map(fd_kind, os.listdir('/proc/self/fd')) if 'eventfd' not in k
                  and '/proc/' not in k),
    'status': {k: status[k].strip() for k in ('Uid', 'Gid', 'CapEff', 'CapBnd', 'NoNewPrivs',
                                               'Seccomp')},
    'hostname': os.uname().nodename, 'pid': os.getpid(),
}))
"""


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    kernels = tmp_path / "kernels"
    write_kernelspec(kernels, POOLED, provisioner="namespace", config={"pool_size": 2})
    (tmp_path / "runtime").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "sub").mkdir()
    return kernels


def the_pool(name: str = POOLED) -> pool_module.KernelPool:
    pools = [p for key, p in pool_module._pools.items() if key[0] == name]
    assert len(pools) == 1, pools
    return pools[0]


async def filled(count: int, name: str = POOLED) -> list[str]:
    """Wait until the kernelspec's pool has `count` ready kernels; their names."""
    deadline = time.monotonic() + 60 * SLOWDOWN
    while True:
        waiting = [k for k in the_pool(name).waiting if k.ready]
        if len(waiting) >= count:
            return [k.name for k in waiting]
        assert time.monotonic() < deadline, "the pool was not refilled"
        await asyncio.sleep(0.1)


async def start(kernels: Path, session: str, cwd: str | None = None,
                cls: type[AsyncKernelManager] = AsyncKernelManager, **kw: Any) -> tuple[Any, Any]:
    km = manager(kernels, POOLED, cls, **kw)
    env = {**os.environ, "JPY_SESSION_NAME": session}
    await km.start_kernel(cwd=cwd or str(kernels.parent / "work"), env=env)
    kc = km.client()
    kc.start_channels()
    RUNNING.append((km, kc))
    await kc.wait_for_ready(timeout=READY_TIMEOUT)
    return km, kc


RUNNING: list[tuple[Any, Any]] = []  # started by start(), not yet stopped


async def finish() -> None:
    """Whatever a test left running (it failed), then the pools."""
    while RUNNING:
        await stop(*RUNNING[-1])
    await close_pools()


async def stop(km: Any, kc: Any) -> None:
    if (km, kc) in RUNNING:
        RUNNING.remove((km, kc))
    kc.stop_channels()
    if km.has_kernel:
        await km.shutdown_kernel(now=True)
    else:
        await km.cleanup_resources()


async def warm_pool(kernels: Path) -> None:
    """The pool, full: the kernelspec's first start makes it (an ordinary start)."""
    km, kc = await start(kernels, "/a.ipynb")
    await stop(km, kc)
    await filled(2)


async def probe(kc: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await execute_ok(kc, PROBE))
    return result


def test_a_pooled_kernel_is_a_fresh_one(kernels: Path, no_leaks: None) -> None:
    async def main() -> None:
        try:
            fresh_km, fresh_kc = await start(kernels, "/nb.ipynb")
            assert not fresh_km.provisioner.pooled  # the first start makes the pool
            await filled(2)
            keys = {k.connection_info["key"]: k.connection_info for k in the_pool().waiting}
            pooled_km, pooled_kc = await start(kernels, "/nb.ipynb")
            assert pooled_km.provisioner.pooled
            # the client talks to the running kernel with its key and sockets, which
            # the server made for it alone; the host's connection file holds them
            adopted = keys[pooled_km.session.key]
            on_host = json.loads(Path(pooled_km.connection_file).read_text())
            assert {k: on_host[k] for k in adopted if k != "key"} == {
                k: v for k, v in adopted.items() if k != "key"}
            assert on_host["key"].encode() == adopted["key"] != fresh_km.session.key
            assert adopted["ip"].startswith(pooled_km.provisioner.socket_dir)
            fresh, pooled = await probe(fresh_kc), await probe(pooled_kc)
            for km, seen in ((fresh_km, fresh), (pooled_km, pooled)):
                assert seen.pop("connection_file") == Path(km.connection_file).read_text()
                assert seen.pop("pid") == 2  # the init's only child
            assert fresh["session"] == "/nb.ipynb"
            assert pooled == fresh
            info = await pooled_km.provisioner.get_provisioner_info()
            assert info["pooled"] is True and info["pid"] == pooled_km.provisioner.sandbox.pid
            assert info["pool_waiting"] >= 1  # refilled since, or not yet
            await stop(fresh_km, fresh_kc)
            await stop(pooled_km, pooled_kc)
        finally:
            await finish()
    run(main())


def test_no_pooled_kernel_is_served_twice_and_the_pool_refills(kernels: Path,
                                                               no_leaks: None) -> None:
    async def main() -> None:
        started: list[tuple[Any, Any]] = []
        try:
            started.append(await start(kernels, "/a.ipynb"))
            served: list[str] = []
            for i in range(3):
                names = await filled(2)
                km, kc = await start(kernels, f"/{i}.ipynb")
                started.append((km, kc))
                assert km.provisioner.pooled
                taken = [n for n in names if n not in {k.name for k in the_pool().waiting}]
                assert len(taken) == 1
                served += taken
                await execute_ok(kc, "x = 1")
            assert len(set(served)) == 3
            pids = {km.provisioner.sandbox.pid for km, _ in started}
            assert len(pids) == len(started)
            await filled(2)
        finally:
            for km, kc in started:
                await stop(km, kc)
            await close_pools()
    run(main())


def test_a_request_the_pool_was_not_made_for_starts_fresh(kernels: Path,
                                                          no_leaks: None) -> None:
    async def main() -> None:
        try:
            await warm_pool(kernels)
            # another cwd: the pooled sandboxes bind the first one
            sub = str(kernels.parent / "work" / "sub")
            km, kc = await start(kernels, "/a.ipynb", cwd=sub)
            assert not km.provisioner.pooled
            assert (await probe(kc))["cwd"] == sub
            await stop(km, kc)
            await filled(2)  # now for the new cwd
            km, kc = await start(kernels, "/b.ipynb", cwd=sub)
            assert km.provisioner.pooled
            await stop(km, kc)
            # a config change: the kernelspec now asks for another hostname
            spec_file = kernels / POOLED / "kernel.json"
            spec = json.loads(spec_file.read_text())
            spec["metadata"]["kernel_provisioner"]["config"]["hostname"] = "changed"
            spec_file.write_text(json.dumps(spec))
            km, kc = await start(kernels, "/c.ipynb", cwd=sub)
            assert not km.provisioner.pooled
            assert (await probe(kc))["hostname"] == "changed"
            await stop(km, kc)
            await filled(2)
            km, kc = await start(kernels, "/d.ipynb", cwd=sub)
            assert km.provisioner.pooled
            assert (await probe(kc))["hostname"] == "changed"
            await stop(km, kc)
        finally:
            await finish()
    run(main())


def test_a_kernelspec_whose_kernel_runs_startup_code_is_not_pooled(
        tmp_path: Path, no_leaks: None, caplog: pytest.LogCaptureFixture) -> None:
    """A pooled kernel runs its init before the session's environment is its own:
    one that would run code in its user namespace then is never handed out."""
    kernels = tmp_path / "kernels"
    write_kernelspec(kernels, POOLED, provisioner="namespace", config={"pool_size": 1},
                     argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                           ("--IPKernelApp.exec_lines=import os; at_start = os.environ.get("
                            "'JPY_SESSION_NAME')")])
    (tmp_path / "runtime").mkdir()
    (tmp_path / "work").mkdir()

    async def main() -> None:
        try:
            for session in ("/a.ipynb", "/b.ipynb"):
                km, kc = await start(kernels, session)
                assert not km.provisioner.pooled
                assert await execute_ok(kc, "print(at_start)") == session + "\n"
                await stop(km, kc)
                deadline = time.monotonic() + 60 * SLOWDOWN
                while the_pool().size and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            assert the_pool().size == 0 and not the_pool().waiting
            assert "would run startup code (IPKernelApp.exec_lines)" in caplog.text
        finally:
            await finish()
    run(main())


def test_interrupt_restart_and_shutdown_of_a_pooled_kernel(kernels: Path,
                                                          no_leaks: None) -> None:
    async def main() -> None:
        try:
            await warm_pool(kernels)
            km, kc = await start(kernels, "/a.ipynb")
            assert km.provisioner.pooled
            # stop_on_error=False: the next request is not aborted for the interrupt
            msg_id = kc.execute(INTERRUPTIBLE, stop_on_error=False)
            while True:
                msg = await kc.get_iopub_msg(timeout=10)
                if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                    break
            await km.interrupt_kernel()
            while True:
                reply = await kc.get_shell_msg(timeout=10)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            await execute_ok(kc, "marker = 1")
            old = km.provisioner.sandbox
            await km.restart_kernel(now=True)
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            assert km.provisioner.sandbox is not old and old.returncode is not None
            assert not km.provisioner.pooled  # a restart starts fresh
            assert "NameError" in await execute_ok(kc, "try:\n marker\nexcept NameError as e:\n"
                                                   " print('NameError')")
            sandbox = km.provisioner.sandbox
            await stop(km, kc)
            assert sandbox.returncode is not None
            assert not os.path.exists(km.connection_file)
        finally:
            await finish()
    run(main())


def test_the_restarter_restarts_a_pooled_kernel_killed_from_outside(kernels: Path,
                                                                    no_leaks: None) -> None:
    async def main() -> None:
        try:
            await warm_pool(kernels)
            km, kc = await start(kernels, "/a.ipynb", cls=AsyncIOLoopKernelManager,
                                 config=Config({"KernelRestarter": {"time_to_dead": 0.2}}))
            assert km.provisioner.pooled
            restarted = asyncio.Event()
            km.add_restart_callback(restarted.set, "restart")
            old = km.provisioner.sandbox
            os.kill(old.pid, signal.SIGKILL)
            await asyncio.wait_for(restarted.wait(), 20)
            await until_restarted(km, old)
            await kc.wait_for_ready(timeout=READY_TIMEOUT)
            assert km.provisioner.sandbox.pid != old.pid
            assert (await execute_ok(kc, "print('back')")).strip() == "back"
            await stop(km, kc)
        finally:
            await finish()
    run(main())


def test_a_pooled_kernel_that_dies_waiting_is_replaced_not_served(
        kernels: Path, no_leaks: None, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        try:
            await warm_pool(kernels)
            victim = the_pool().waiting[0]
            victim.proc.kill()
            deadline = time.monotonic() + 20
            while victim in the_pool().waiting:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            names = await filled(2)
            assert victim.name not in names
            km, kc = await start(kernels, "/b.ipynb")
            assert km.provisioner.pooled
            assert km.provisioner.sandbox is not victim.proc
            await stop(km, kc)
        finally:
            await finish()
    run(main())
    assert any("died while waiting" in r.getMessage() for r in caplog.records)


def test_a_pooled_kernel_that_cannot_start_leaves_nothing_and_the_pool_short(
        kernels: Path, monkeypatch: pytest.MonkeyPatch, no_leaks: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The pool's starts fail in the helper (its mount step, the fault switch):
    the ordinary start still works, the failure is logged, and neither a process
    nor a socket dir, runtime dir or connection file of the failed starts is left."""
    from nsprovisioner import pooled_kernel

    real_spawn = pooled_kernel.spawn

    async def failing_spawn(*args: Any, **kw: Any) -> Any:
        return await real_spawn(*args, _fault_step="mount", **kw)

    monkeypatch.setattr(pooled_kernel, "spawn", failing_spawn)

    async def main() -> None:
        try:
            km, kc = await start(kernels, "/a.ipynb")
            assert not km.provisioner.pooled
            assert (await execute_ok(kc, "print(6 * 7)")).strip() == "42"
            filling = the_pool()._filling
            assert filling is not None
            await asyncio.wait_for(filling, 60 * SLOWDOWN)
            assert not the_pool().waiting
            server_dir = os.path.dirname(km.provisioner.socket_dir)
            assert [e for e in os.listdir(server_dir) if e.startswith("pool")] == []
            await stop(km, kc)
        finally:
            await finish()
    run(main())
    assert any("could not start" in r.getMessage() and "mount" in r.getMessage()
               for r in caplog.records), caplog.text


REACH = """
import json, os, socket
found = {}
for path in PATHS:
    try:
        os.stat(path)
        found[path] = 'visible'
    except OSError as e:
        found[path] = e.strerror
for path in SOCKETS:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        found[path] = 'connected'
    except OSError as e:
        found[path] = e.strerror
    finally:
        s.close()
print(json.dumps(found))
"""


def test_a_notebook_cannot_reach_the_kernels_waiting_in_its_pool(kernels: Path,
                                                                  no_leaks: None) -> None:
    """A waiting kernel is the next notebook's: with its key and a socket, a
    notebook could run code in that notebook's kernel once it is handed out. From a
    pooled kernel and a fresh one of the same kernelspec, none of the waiting
    kernels' sockets, socket dirs, runtime dirs or connection files can be found
    or connected to."""
    async def main() -> None:
        try:
            fresh = await start(kernels, "/a.ipynb")  # makes the pool
            await filled(2)
            pooled = await start(kernels, "/b.ipynb")
            assert pooled[0].provisioner.pooled
            await filled(2)
            waiting = the_pool().waiting
            sockets = [f"{k.connection_info['ip']}-{k.connection_info[key]}" for k in waiting
                       for key in ("shell_port", "iopub_port", "stdin_port", "control_port",
                                   "hb_port")]
            assert all(os.path.exists(p) for p in sockets)  # they are there, on the host
            paths = [p for k in waiting for p in (k.socket_dir, k.runtime_dir, k.own_file)]
            code = f"PATHS = {paths!r}\nSOCKETS = {sockets!r}\n" + REACH
            for km, kc in (fresh, pooled):
                found = json.loads(await execute_ok(kc, code))
                assert set(found.values()) <= {"No such file or directory"}, found
                await stop(km, kc)
        finally:
            await finish()
    run(main())


# ---- a real jupyter_server -----------------------------------------------------------

def cgroups_named(part: str) -> list[str]:
    found = subprocess.run(["find", "/sys/fs/cgroup", "-type", "d", "-name", f"*{part}*"],
                           check=False, capture_output=True, text=True).stdout.split()
    return found


@pytest.mark.parametrize("end", ["SIGTERM", "SIGKILL"])
def test_a_server_hands_out_culls_and_leaves_nothing_when_it_ends(tmp_path: Path,
                                                                  end: str) -> None:
    kernels = tmp_path / "share" / "kernels"
    write_kernelspec(kernels, POOLED, provisioner="namespace", config={"pool_size": 1})
    (tmp_path / "root").mkdir()
    log = tmp_path / "server.log"
    server, url = start_jupyter(tmp_path, TOKEN, log, "--MappingKernelManager.cull_idle_timeout=3",
                                "--MappingKernelManager.cull_interval=1",
                                "--ServerApp.log_level=DEBUG")  # for the pool's "ready"
    try:
        first = request("POST", url + "/api/kernels", {"name": POOLED})[1]["id"]
        deadline = time.monotonic() + 60
        pool_dirs = os.path.join(sockets_parent(), f"server-{server.pid}-*", "*.pool-runtime")
        while not glob.glob(pool_dirs) or f"({POOLED}) ready after" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()  # a start would miss the pool
            time.sleep(0.2)
        # doctor counts it: one waiting kernel of this server
        assert waiting_on_host().get(server.pid) == 1
        assert "1 waiting (1 in server" in check_pools(HostFacts(
            pooled_kernels=waiting_on_host())).detail
        second = request("POST", url + "/api/kernels", {"name": POOLED})[1]["id"]
        assert f"kernel {second} ({POOLED}) came from the pool" in log.read_text()
        assert f"kernel {first} ({POOLED}) came from the pool" not in log.read_text()
        deadline = time.monotonic() + 30
        while request("GET", f"{url}/api/kernels/{second}")[0] != 404:  # culled
            assert time.monotonic() < deadline, "the pooled kernel was not culled"
            time.sleep(0.5)
        while not glob.glob(pool_dirs):  # refilled
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        waiting = [os.path.basename(d).split("-")[0] for d in glob.glob(pool_dirs)]
    finally:
        # SIGTERM: a clean exit (atexit); SIGKILL: no cleanup of its own
        server.send_signal(getattr(signal, end))
        server.wait(30)
    # the pooled kernel died with the server (PR_SET_PDEATHSIG), nothing runs in its name
    deadline = time.monotonic() + 10
    while any(p for p in Path("/proc").iterdir() if p.name.isdigit() and
              waiting[0] in _cgroup_of(p)):
        assert time.monotonic() < deadline, "a pooled kernel outlived its server"
        time.sleep(0.2)
    # after SIGKILL the next server sweeps what this one left: sockets, copies of
    # connection files, cgroups; a clean exit leaves nothing to sweep
    if end == "SIGKILL":
        from nsprovisioner.cgroup_layout import sweep_stale_cgroups
        from nsprovisioner.ipcdir import sweep_dead_servers
        sweep_dead_servers(str(tmp_path / "runtime"))
        sweep_stale_cgroups("auto")
    assert not glob.glob(os.path.join(sockets_parent(), f"server-{server.pid}-*"))
    assert not cgroups_named(waiting[0])


def _cgroup_of(p: Path) -> str:
    try:
        return (p / "cgroup").read_text()
    except OSError:
        return ""


def test_an_installed_kernelspec_with_pool_size_is_pooled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], no_leaks: None) -> None:
    src = tmp_path / "path" / "kernels" / "src"
    write_kernelspec(tmp_path / "path" / "kernels", "src", provisioner="local")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "path"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    assert cli_main(["install", "--from", "src", "--name", "warm", "--config",
                     "pool_size=-1"]) != 0
    assert "pool_size -1 must be a whole number >= 0" in capsys.readouterr().err
    assert cli_main(["install", "--from", "src", "--name", "warm", "--config",
                     "pool_size=1"]) == 0
    spec = json.loads((tmp_path / "data" / "kernels" / "warm" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"] == {"pool_size": 1}
    assert src.exists()
    (tmp_path / "data" / "runtime").mkdir()  # manager()'s connection files
    (tmp_path / "work").mkdir()

    async def main() -> None:
        kernels = tmp_path / "data" / "kernels"
        try:
            for pooled in (False, True):
                km = manager(kernels, "warm")
                await km.start_kernel(cwd=str(tmp_path / "work"))
                assert km.provisioner.pooled is pooled
                kc = km.client()
                kc.start_channels()
                await kc.wait_for_ready(timeout=READY_TIMEOUT)
                assert (await execute_ok(kc, "print(6 * 7)")).strip() == "42"
                await stop(km, kc)
                if not pooled:
                    await filled(1, "warm")
        finally:
            await finish()
    run(main())
