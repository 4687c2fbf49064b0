"""The sandbox core: the handshake, identity, the init, the handle, errors.

Every test starts real sandboxes through spawn() or `nsprovisioner run`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nsprovisioner import PIPE, SandboxError, SandboxSpec, spawn
from nsprovisioner.cgroup_layout import sweep_stale_cgroups
from nsprovisioner.errors import STEP_NAMES
from nsprovisioner.idmap import subordinate_ranges

from .conftest import child_processes, open_fds, require_limit, run

NAMESPACES = ("pid", "user", "mnt", "ipc", "uts", "cgroup")
ROOT = os.geteuid() == 0


async def output_of(spec: SandboxSpec, argv: list[str], **kwargs: object) -> tuple[int, str]:
    proc = await spawn(spec, argv, stdout=PIPE, **kwargs)  # type: ignore[arg-type]
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(None, proc.stdout.read)
    code = await proc.wait()
    proc.close_pipes()
    return code, out.decode()


def python_in_sandbox(code: str, spec: SandboxSpec | None = None) -> tuple[int, str]:
    return run(output_of(spec or SandboxSpec(), [sys.executable, "-c", textwrap.dedent(code)]))


REPORT = """
    import json, os
    ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES}
    status = dict(l.split(":", 1) for l in open("/proc/1/status").read().splitlines())
    print(json.dumps({
        "ns": ns, "pid": os.getpid(), "ppid": os.getppid(),
        "init_ppid": int(status["PPid"].strip()),
        "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "gid_map": open("/proc/self/gid_map").read().split(),
        "setgroups": open("/proc/self/setgroups").read().strip(),
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    }))
""".replace("NAMESPACES", repr(NAMESPACES))


def report(spec: SandboxSpec) -> dict[str, object]:
    code, out = python_in_sandbox(REPORT, spec)
    assert code == 0, out
    result: dict[str, object] = json.loads(out)
    return result


def test_namespaces_differ_from_the_hosts(no_leaks: None) -> None:
    inside = report(SandboxSpec())["ns"]
    assert isinstance(inside, dict)
    for name in NAMESPACES:
        assert inside[name] != os.readlink(f"/proc/self/ns/{name}"), name


def test_command_is_child_of_pid_1_whose_parent_is_outside(no_leaks: None) -> None:
    r = report(SandboxSpec())
    assert r["ppid"] == 1
    assert r["init_ppid"] == 0
    # /proc shows the init and the command, nothing of the host
    assert r["procs"] == [1, r["pid"]]


def test_without_init_the_command_is_pid_1(no_leaks: None) -> None:
    r = report(SandboxSpec(init=False))
    assert r["pid"] == 1
    assert r["ppid"] == 0
    assert r["procs"] == [1]


def test_user_self_maps_own_ids(no_leaks: None) -> None:
    r = report(SandboxSpec(user="self"))
    uid, gid = os.getuid(), os.getgid()
    assert r["uid_map"] == [str(uid), str(uid), "1"]
    assert r["gid_map"] == [str(gid), str(gid), "1"]
    assert r["ids"] == [uid, uid, gid, gid]
    assert r["setgroups"] == ("allow" if ROOT else "deny")


def test_user_root_maps_zero_to_caller(no_leaks: None) -> None:
    r = report(SandboxSpec(user="root"))
    assert r["uid_map"] == ["0", str(os.getuid()), "1"]
    assert r["gid_map"] == ["0", str(os.getgid()), "1"]
    assert r["ids"] == [0, 0, 0, 0]


def _multi_range_maps() -> tuple[list[str], list[str]]:
    if ROOT:
        return ["0:100000:65536"], ["0:100000:65536"]
    subuid = subordinate_ranges(Path("/etc/subuid"), os.getuid())
    subgid = subordinate_ranges(Path("/etc/subgid"), os.getuid())
    if not subuid or not subgid or shutil.which("newuidmap") is None:
        pytest.fail("rootless runs need newuidmap and /etc/subuid ranges (.ci/run sets them up)")
    return ([f"0:{os.getuid()}:1", f"1:{subuid[0][0]}:{min(subuid[0][1], 65536)}"],
            [f"0:{os.getgid()}:1", f"1:{subgid[0][0]}:{min(subgid[0][1], 65536)}"])


def test_multi_range_maps(no_leaks: None) -> None:
    """As root written directly; rootless through newuidmap/newgidmap and /etc/subuid."""
    uid_map, gid_map = _multi_range_maps()
    r = report(SandboxSpec(user="root", uid_map=uid_map, gid_map=gid_map))
    expect = [part for entry in uid_map for part in entry.split(":")]
    assert r["uid_map"] == expect
    assert r["gid_map"] == [part for entry in gid_map for part in entry.split(":")]
    assert r["ids"] == [0, 0, 0, 0]
    # (ids of the extra range can't be used for chown: the command holds no
    # capabilities, also as root inside; that is the boundary tests' business)


def test_map_outside_subuid_ranges_is_refused_before_clone(no_leaks: None) -> None:
    if ROOT:
        pytest.skip("root may map any id; the subuid check applies to unprivileged callers")
    with pytest.raises(SandboxError, match="/etc/subuid"):
        run(spawn(SandboxSpec(user="root", uid_map=[f"0:{os.getuid()}:1", "1:5:10"]), ["true"]))


def test_missing_newuidmap_is_named(no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    if ROOT:
        pytest.skip("root writes every map directly")
    monkeypatch.setenv("PATH", "/nonexistent")
    uid_map, gid_map = (["0:0:1", "1:1:1"], ["0:0:1", "1:1:1"])
    with pytest.raises(SandboxError, match="apt-get install uidmap"):
        run(spawn(SandboxSpec(user="root", uid_map=uid_map, gid_map=gid_map), ["/bin/true"]))


@pytest.mark.parametrize("init", [True, False])
def test_exit_status_propagates(init: bool, no_leaks: None) -> None:
    async def main() -> int:
        proc = await spawn(SandboxSpec(init=init), ["sh", "-c", "exit 42"])
        return await proc.wait()
    assert run(main()) == 42


def test_signal_death_is_128_plus_signal(no_leaks: None) -> None:
    async def main() -> int:
        proc = await spawn(SandboxSpec(), ["sh", "-c", "kill -SEGV $$"])
        return await proc.wait()
    assert run(main()) == 128 + signal.SIGSEGV


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signals_reach_the_command_through_the_init(sig: int, no_leaks: None) -> None:
    script = (f"trap 'echo got; exit 7' {signal.Signals(sig).name[3:]}; echo ready; "
              "while :; do sleep 0.05; done")

    async def main() -> tuple[int, bytes]:
        proc = await spawn(SandboxSpec(), ["sh", "-c", script], stdout=PIPE)
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, proc.stdout.readline) == b"ready\n"
        proc.send_signal(sig)
        rest = await loop.run_in_executor(None, proc.stdout.read)
        code = await proc.wait()
        proc.close_pipes()
        return code, rest
    assert run(main()) == (7, b"got\n")


def test_interrupt_reaches_the_commands_children(no_leaks: None) -> None:
    """SIGINT goes to the command's process group: a `sleep` it started dies at once."""
    # "ready" only once `sleep` runs: Popen returns after the exec
    script = ("import subprocess; p = subprocess.Popen(['sleep', '30']); "
              "print('ready', flush=True); p.wait()")

    async def main() -> float:
        proc = await spawn(SandboxSpec(), [sys.executable, "-c", script], stdout=PIPE)
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, proc.stdout.readline) == b"ready\n"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        await proc.wait()
        proc.close_pipes()
        return time.monotonic() - t0
    assert run(main()) < 5


def test_orphans_are_reaped_by_the_init(no_leaks: None) -> None:
    code, out = python_in_sandbox("""
        import os, subprocess, time
        # the middle shell exits at once: its child is reparented to PID 1
        subprocess.run(["sh", "-c", "sh -c 'sleep 0.2' & exit 0"])
        time.sleep(1.0)
        states = [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
                  for p in os.listdir("/proc") if p.isdigit()]
        print(" ".join(states))
    """)
    assert code == 0
    assert "Z" not in out.split(), out


SHOW_PID_NS = "readlink /proc/self/ns/pid; "  # the init is not dumpable: ask the command


def test_kill_of_init_leaves_nothing_in_the_pid_namespace(no_leaks: None) -> None:
    async def main() -> None:
        script = SHOW_PID_NS + "sleep 100 & sleep 100 & wait"
        proc = await spawn(SandboxSpec(), ["sh", "-c", script], stdout=PIPE)
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        ns = (await loop.run_in_executor(None, proc.stdout.readline)).decode().strip()
        # init, sh, 2 x sleep (only root may look at the init's namespaces: it
        # is not dumpable), once sh has started both
        deadline = time.monotonic() + 10
        while (len(seen := set(processes_in_pid_ns(ns)) | {proc.pid}) < 4
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        assert len(seen) == 4
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        proc.close_pipes()
        assert processes_in_pid_ns(ns) == []
    run(main())


def processes_in_pid_ns(ns: str) -> list[int]:
    """Live processes in the pid namespace `ns`. A zombie runs nothing: once its
    parent is gone only the host's init can reap it, on its own schedule."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.readlink(f"/proc/{p}/ns/pid") == ns and state != "Z":
                    found.append(int(p))
            except OSError:
                pass
    return found


SPAWNER = """
import asyncio, os, sys
from nsprovisioner import PIPE, SandboxSpec, spawn
async def main():
    proc = await spawn(SandboxSpec(), ["sh", "-c", "readlink /proc/self/ns/pid; exec sleep 300"],
                       stdout=PIPE)
    print(proc.stdout.readline().decode().strip(), flush=True)
    await proc.wait()
asyncio.run(main())
"""


def test_sigkill_of_the_starting_process_kills_the_sandbox() -> None:
    starter = subprocess.Popen([sys.executable, "-c", SPAWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout is not None
        ns = starter.stdout.readline().strip()
        assert ns.startswith("pid:[")
        assert processes_in_pid_ns(ns)
    finally:
        starter.kill()
        starter.wait()
    deadline = time.monotonic() + 1.0
    while processes_in_pid_ns(ns) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes_in_pid_ns(ns) == []
    # a killed server can't remove its sandboxes' cgroups: the next one sweeps them
    sweep_stale_cgroups()


def test_process_handle_is_race_free_after_exit(no_leaks: None) -> None:
    async def main() -> None:
        proc = await spawn(SandboxSpec(), ["true"])
        assert await proc.wait() == 0
        assert proc.poll() == 0
        proc.send_signal(signal.SIGTERM)  # after reaping: a no-op, never another process
        proc.kill()
    run(main())


def test_exited_does_not_reap_and_kill_now_needs_no_event_loop(no_leaks: None) -> None:
    """What a pool's at-exit cleanup relies on: exited() sees an exit and leaves
    reaping to poll(); kill_now(), with the spawning loop gone, kills the sandbox
    and reaps it, and removes its cgroup and pipes, before it returns."""
    spec = SandboxSpec(pids_limit=64)
    require_limit(spec, "pids")

    async def start(argv: list[str]) -> Any:
        return await spawn(spec, argv, stdout=PIPE)

    proc = run(start(["true"]))
    deadline = time.monotonic() + 10
    while not proc.exited():
        assert time.monotonic() < deadline, "exited() never saw the sandbox exit"
        time.sleep(0.01)
    assert proc.returncode is None and proc.pidfd >= 0  # not reaped: still ours to poll()
    assert proc.poll() == 0 and proc.exited()
    proc.close_pipes()

    proc = run(start(["sh", "-c", "readlink /proc/self/ns/pid; exec sleep 300"]))
    assert proc.stdout is not None
    ns = proc.stdout.readline().decode().strip()
    cgroups = list(proc.cgroup.paths) if proc.cgroup is not None else []
    assert cgroups and all(os.path.isdir(d) for d in cgroups)
    assert not proc.exited()
    proc.kill_now()  # no event loop here
    assert proc.returncode == -signal.SIGKILL and proc.pidfd == -1
    assert processes_in_pid_ns(ns) == []
    assert not [d for d in cgroups if os.path.exists(d)]
    assert proc.stdout.closed
    proc.kill_now()  # again: nothing left to do


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return len(f.readlines())


def test_200_spawns_in_a_row_leak_nothing() -> None:
    """No process, fd, or mapping."""
    async def main(n: int) -> None:
        for _ in range(n):
            proc = await spawn(SandboxSpec(), ["/bin/true"])
            assert await proc.wait() == 0

    run(main(5))  # caches and arenas settle
    fds, maps = open_fds(), mappings()
    run(main(200))
    assert child_processes() == []
    assert open_fds() - fds == set()
    assert mappings() - maps < 20


def test_concurrent_spawns_from_threads_while_others_allocate() -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def allocate() -> None:
        while not stop.is_set():
            blocks = [bytearray(1 << 20) for _ in range(20)]
            del blocks

    def spawner() -> None:
        async def main() -> None:  # 4 threads x 5 at once: 20 handshakes in flight
            procs = await asyncio.gather(*(spawn(SandboxSpec(), ["/bin/true"])
                                           for _ in range(5)))
            for proc in procs:
                assert await proc.wait() == 0
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported below, with the others
            errors.append(e)

    fds = open_fds()
    allocators = [threading.Thread(target=allocate) for _ in range(2)]
    spawners = [threading.Thread(target=spawner) for _ in range(4)]
    for t in allocators + spawners:
        t.start()
    for t in spawners:
        t.join(60)
    stop.set()
    for t in allocators:
        t.join()
    assert errors == []
    assert child_processes() == []
    assert open_fds() - fds == set()


# Every step the fault switch can fail; the error must name it.
FAULT_STEPS = [name for value, name in sorted(STEP_NAMES.items()) if value]
# The steps that run in the helper (the Child, GrandChild and init), where it
# can crash; the Parent's own steps are Python, and raise.
STAGE_STEPS = [name for value, name in sorted(STEP_NAMES.items()) if value >= 10]


def fault_spec(step: str) -> SandboxSpec:
    """A spec that runs `step`: the GrandChild's exec is the command's only without init."""
    if step == "loopback":
        return SandboxSpec(network="none")
    if step == "network":  # fails after pasta started, which must go too
        return SandboxSpec(network="egress")
    if step == "exec":
        return SandboxSpec(init=False)
    return SandboxSpec()


@pytest.mark.parametrize("step", FAULT_STEPS)
def test_each_step_failing_leaks_nothing(step: str, no_leaks: None) -> None:
    with pytest.raises(SandboxError) as info:
        run(spawn(fault_spec(step), ["/bin/true"], _fault_step=step))
    assert step in str(info.value)


async def spawn_and_wait(spec: SandboxSpec) -> int:
    proc = await spawn(spec, ["/bin/true"])
    return await proc.wait()


@pytest.mark.parametrize("kind", ["segv", "abrt"])
@pytest.mark.parametrize("step", STAGE_STEPS)
def test_a_stage_crashing_at_any_step_leaves_the_server_unharmed(
        step: str, kind: str, no_leaks: None) -> None:
    """The stages are processes of their own: a crash kills only the stage,
    the start fails with a SandboxError, and the next start works. (Past the
    init's fork the crash is the command's process's: the init reports it.)"""
    async def main() -> int | None:
        try:
            proc = await spawn(fault_spec(step), ["/bin/true"], _fault_step=step,
                               _fault_kind=kind)
        except SandboxError as e:
            assert "killed by SIG" in str(e)  # the crash, not a vague exit
            return None
        return await proc.wait()

    sig = signal.SIGSEGV if kind == "segv" else signal.SIGABRT
    status = run(main())
    assert status is None or (step == "init_exec" and status == 128 + sig)
    assert run(spawn_and_wait(SandboxSpec())) == 0


@pytest.mark.parametrize("step", ["unshare_namespaces", "mount", "init_setup"])
def test_a_stage_killed_by_its_cgroups_memory_limit_leaves_the_server_unharmed(
        step: str, no_leaks: None) -> None:
    """The OOM killer kills every process sharing the victim's memory: the
    stages share none of the server's."""
    spec = SandboxSpec(memory_limit="4M")
    with pytest.raises(SandboxError):
        run(spawn(spec, ["/bin/true"], _fault_step=step, _fault_kind="memory"))
    assert run(spawn_and_wait(spec)) == 0


@pytest.mark.parametrize("bad, named", [
    ({"namespaces": ["pid", "user", "mount", "time"]}, "'time'"),
    ({"namespaces": ["user", "mount"]}, "pid"),
    ({"user": "nobody"}, "'nobody'"),
    ({"uid_map": ["0:1000:0"]}, "0:1000:0"),
    ({"uid_map": ["0:100000:10", "5:200000:10"]}, "5:200000:10"),
    ({"uid_map": ["0:100000:10", "20:100005:10"]}, "20:100005:10"),
    ({"uid_map": ["0:4294967295:1"]}, "0:4294967295:1"),
    ({"uid_map": ["a:b:c"]}, "'a:b:c'"),
    ({"uid_map": []}, "uid_map is empty"),
    ({"network": "bridge"}, "'bridge'"),
    ({"hostname": "bad host"}, "'bad host'"),
])
def test_invalid_specs_are_rejected_naming_the_value(bad: dict[str, object], named: str) -> None:
    with pytest.raises(SandboxError) as info:
        SandboxSpec(**bad)  # type: ignore[arg-type]
    message = str(info.value)
    assert next(iter(bad)).split("_")[0] in message  # the key
    assert named in message                           # and the bad value


@pytest.mark.parametrize("argv, match", [
    ([], "argv is empty"),
    (["echo", "a\0b"], "NUL"),
    ("echo hi", "not the string"),
])
def test_invalid_argv_is_rejected_before_clone(argv: object, match: str, no_leaks: None) -> None:
    with pytest.raises(SandboxError, match=match):
        run(spawn(SandboxSpec(), argv))  # type: ignore[arg-type]


@pytest.mark.parametrize("init", [True, False])
def test_command_not_found_and_not_executable(init: bool, no_leaks: None,
                                              tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="No such file") as info:
        run(spawn(SandboxSpec(init=init), ["no-such-command-here"]))
    assert "not found" in str(info.value)
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SandboxError, match="Permission denied|not executable"):
        # the host's /tmp, where pytest's tmp_path lives, so the script is visible
        run(spawn(SandboxSpec(init=init, private_tmp=False), [str(script)]))


def test_bad_cwd_is_named(no_leaks: None) -> None:
    with pytest.raises(SandboxError, match="/no/such/dir"):
        run(spawn(SandboxSpec(), ["true"], cwd="/no/such/dir"))


def test_cwd_and_env_are_passed(no_leaks: None, tmp_path: Path) -> None:
    code, out = run(output_of(SandboxSpec(), ["sh", "-c", "pwd; echo $ONLY"],
                              cwd=str(tmp_path), env={"ONLY": "this", "PATH": "/usr/bin:/bin"}))
    assert (code, out.split()) == (0, [str(tmp_path), "this"])


def test_disabled_user_namespaces_are_explained() -> None:
    """user.max_user_namespaces is per user namespace: set it to 0 in a throw-away one."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare(1) from util-linux is needed for this test")
    probe = (
        "import asyncio\n"
        "from nsprovisioner import SandboxSpec, SandboxError, spawn\n"
        "try:\n"
        "    asyncio.run(spawn(SandboxSpec(), ['true']))\n"
        "except SandboxError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c \"$0\"",
         probe], capture_output=True, text=True, timeout=60, check=False)
    assert "unshare_user" in result.stdout, result.stdout + result.stderr
    assert "max_user_namespaces" in result.stdout


def test_cli_run_passes_stdio_and_exit_status() -> None:
    cli = [sys.executable, "-m", "nsprovisioner.cli"]
    result = subprocess.run([*cli, "run", "--", "sh", "-c", "read x; echo got $x; exit 3"],
                            input="hello\n", capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (3, "got hello\n")
    assert subprocess.run([*cli, "run", "--", "no-such-command"],
                          capture_output=True, timeout=60, check=False).returncode == 127
    result = subprocess.run([*cli, "run", "--user", "root", "--", "id", "-u"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout == "0\n"
    help_text = subprocess.run([*cli, "run", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for flag in ("--user", "--uid-map", "--gid-map", "--network", "--no-init", "--cwd"):
        assert flag in help_text


def test_stages_carry_readable_process_names(monkeypatch: pytest.MonkeyPatch,
                                             no_leaks: None) -> None:
    """Caught mid-handshake: the Child while its maps are written, the GrandChild
    when its pid arrives (it waits for SYNC_GRANDCHILD then)."""
    from nsprovisioner import handshake

    spawn_module = sys.modules["nsprovisioner.spawn"]
    names: dict[str, str] = {}
    write_maps = spawn_module.write_id_maps
    pidfd_open = os.pidfd_open

    async def write_maps_and_look(pid: int, *args: object) -> None:
        names["child"] = Path(f"/proc/{pid}/comm").read_text().strip()
        await write_maps(pid, *args)

    def pidfd_open_and_look(pid: int, *args: int) -> int:
        names["grandchild"] = Path(f"/proc/{pid}/comm").read_text().strip()
        return pidfd_open(pid, *args)

    monkeypatch.setattr(spawn_module, "write_id_maps", write_maps_and_look)
    monkeypatch.setattr(handshake.os, "pidfd_open", pidfd_open_and_look)

    async def main() -> None:
        proc = await spawn(SandboxSpec(), ["/bin/true"])
        await proc.wait()
    run(main())
    assert names == {"child": "nsprov[1:CHILD]", "grandchild": "nsprov[2:INIT]"}


@pytest.mark.parametrize("step", ["clone_child", "write_id_maps", "init_exec", None])
def test_failed_spawn_with_pipes_leaks_nothing(step: str | None, no_leaks: None) -> None:
    argv = ["/bin/true"] if step else ["no-such-command-here"]
    with pytest.raises(SandboxError):
        run(spawn(SandboxSpec(), argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, _fault_step=step))


def dumpable() -> int:
    import ctypes
    return int(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def test_an_identity_mapped_elsewhere_leaves_the_server_dumpable(no_leaks: None) -> None:
    """The GrandChild taking ids that are not ours outside changes its credentials;
    that must change nothing of the server's (an unprivileged server could
    write no more maps after)."""
    if os.geteuid() == 0:
        outside_uid = outside_gid = 100000
    else:
        subuids = subordinate_ranges(Path("/etc/subuid"), os.getuid())
        subgids = subordinate_ranges(Path("/etc/subgid"), os.getgid())
        if not subuids or not subgids:
            pytest.skip("needs subordinate ids in /etc/subuid and /etc/subgid")
        outside_uid, outside_gid = subuids[0][0], subgids[0][0]
    spec = SandboxSpec(user="root", uid_map=[f"0:{outside_uid}:1"],
                       gid_map=[f"0:{outside_gid}:1"], readwrite_paths=[])

    async def main() -> tuple[int, int]:
        proc = await spawn(spec, ["/bin/true"], cwd="/")
        status = await proc.wait()
        again = await spawn(SandboxSpec(), ["/bin/true"])
        return status, await again.wait()

    assert dumpable() == 1
    assert run(main()) == (0, 0)
    assert dumpable() == 1


NON_DUMPABLE_SERVER = """
import asyncio, ctypes, sys
from nsprovisioner import SandboxSpec, spawn
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as after a setuid start
async def main():
    proc = await spawn(SandboxSpec(), ["/bin/true"])
    return await proc.wait()
sys.exit(asyncio.run(main()))
"""


def test_a_non_dumpable_server_still_starts_sandboxes() -> None:
    """Its /proc files are root's; the helper's, after its exec, are its own
    (meaningful in the rootless run)."""
    result = subprocess.run([sys.executable, "-c", NON_DUMPABLE_SERVER], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
