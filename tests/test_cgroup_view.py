"""The sandbox's /sys/fs/cgroup: its own cgroup, with its limits, read-only (cgroup_view.py).

Runs on this host's hierarchies (cgroup v1 with a v2 mount beside it here)
and, through scripts/vm-guest.sh, on a pure cgroup-v2 kernel, as root and as
a user with a delegated subtree.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from nsprovisioner import SandboxSpec

from .conftest import SLOWDOWN, run
from .test_cgroups import CANT_LIMIT, MiB, _need, finish, no_cgroup_left, running, start

__all__ = ["no_cgroup_left"]  # a fixture, used by name

# What a library that sizes itself from the cgroup reads, v2 file first, then v1's.
READ_VIEW = """
import json, os

def first(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None

print(json.dumps({
    "memory": first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "pids": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "cpu": first("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    "tree": sorted(os.path.relpath(d, "/sys/fs/cgroup") for d, _, _ in os.walk("/sys/fs/cgroup")),
}))
"""

# A kernel that wants more: every way to change its cgroup through the view.
RAISE_LIMITS = """
import errno, json, os

def attempt(fn, *args):
    try:
        fn(*args)
        return "done"
    except OSError as e:
        return errno.errorcode[e.errno]

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

results = {}
for directory, _, files in os.walk("/sys/fs/cgroup"):
    for name in files:
        if name.endswith((".max", ".limit_in_bytes", ".cfs_quota_us", ".high", ".procs",
                          ".subtree_control", ".memsw.limit_in_bytes")):
            path = os.path.join(directory, name)
            results["write " + path] = attempt(write, path, "max" if ".max" in name else "-1")
            results["chmod " + path] = attempt(os.chmod, path, 0o666)
    results["mkdir in " + directory] = attempt(os.mkdir, os.path.join(directory, "escape"))
results["rmdir /sys/fs/cgroup/memory"] = attempt(os.rmdir, "/sys/fs/cgroup/memory")
results["symlink"] = attempt(os.symlink, "/", "/sys/fs/cgroup/evil")
print(json.dumps(results))
"""

LIMITS = SandboxSpec(memory_limit="96M", pids_limit=7, cpu_limit=1.5)


def view_of(spec: SandboxSpec) -> dict[str, object]:
    async def go() -> tuple[int, str]:
        proc = await start(spec, READ_VIEW)
        async with running(proc):
            return await finish(proc)

    status, out = run(go())
    assert status == 0, out
    view: dict[str, object] = json.loads(out)
    return view


def test_limits_read_from_inside_are_the_configured_ones(no_leaks: None,
                                                        no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    view = view_of(LIMITS)
    assert view["memory"] == str(96 * MiB)
    assert view["pids"] == "7"
    assert view["cpu"] in ("150000 100000", "150000")  # v2's cpu.max, v1's cfs_quota_us
    # the sandbox's own cgroup is the root of what it sees: no other cgroup of the host
    tree = view["tree"]
    assert isinstance(tree, list)
    assert all(entry.count("/") == 0 for entry in tree), tree
    assert not any(word in entry for entry in tree for word in ("nsprov", "sandbox-", ".slice")), tree


def test_a_sandbox_cant_change_its_cgroup(no_leaks: None, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    spec = SandboxSpec(memory_limit="64M", pids_limit=20, cpu_limit=0.5)

    async def go() -> tuple[int, str, dict[str, str]]:
        proc = await start(spec, RAISE_LIMITS)
        async with running(proc):
            assert proc.cgroup is not None
            files = [os.path.join(d.path, f) for d in proc.cgroup.dirs
                     for f in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max",
                               "cpu.cfs_quota_us") if os.path.exists(os.path.join(d.path, f))]
            values: dict[str, str] = {}
            proc.add_exit_callback(  # read when it has exited, before its cgroup goes
                lambda _: values.update({f: Path(f).read_text().strip() for f in files}))
            status, out = await finish(proc)
            return status, out, values

    status, out, values = run(go())
    assert status == 0, out
    results = json.loads(out)
    assert any(key.startswith("write ") and "pids.max" in key for key in results), results
    assert all(result in ("EROFS", "EPERM", "EACCES") for result in results.values()), results
    assert values and set(values.values()) <= {str(64 * MiB), "20", "50000 100000", "50000"}, \
        values


def test_without_a_cgroup_namespace_the_hosts_tree_is_hidden(no_leaks: None,
                                                             no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    namespaces = tuple(n for n in SandboxSpec().namespaces if n != "cgroup")
    view = view_of(SandboxSpec(memory_limit="64M", namespaces=namespaces))
    assert view == {"memory": None, "pids": None, "cpu": None, "tree": ["."]}


def test_without_limits_nothing_of_the_host_shows(no_leaks: None,
                                                 no_cgroup_left: None) -> None:
    """No limit: no cgroup (rootless), or one with no limit in it (its v2 directory, for
    the kill); either way only the sandbox's own, unlimited."""
    view = view_of(SandboxSpec(nproc_limit=None))
    assert {view["memory"], view["pids"], view["cpu"]} <= {None, "max", "max 100000"}, view
    tree = view["tree"]
    assert isinstance(tree, list) and set(tree) <= {".", "unified"}, tree


@pytest.mark.timeout(120 * SLOWDOWN)
def test_a_kernel_reads_its_limits(tmp_path: Path, no_cgroup_left: None) -> None:
    _need(CANT_LIMIT)
    kernels = tmp_path / "kernels"
    (kernels / "limited").mkdir(parents=True)
    (kernels / "limited" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "limited", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner",
                                            "config": {"memory_limit": "200M",
                                                       "pids_limit": 50, "cpu_limit": 1}}}}))

    async def main() -> str:
        km = AsyncIOLoopKernelManager(
            kernel_name="limited",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        out: list[str] = []
        try:
            await kc.wait_for_ready(timeout=30 * SLOWDOWN)
            reply = await kc.execute_interactive(
                READ_VIEW, timeout=30 * SLOWDOWN,
                output_hook=lambda m: out.append(m["content"].get("text", "")))
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            await asyncio.sleep(0)
        return "".join(out)

    view = json.loads(run(main()))
    assert view["memory"] == str(200 * MiB)
    assert view["pids"] == "50"
    assert view["cpu"] in ("100000 100000", "100000")
