"""GPUs and other device nodes in the sandbox's /dev (devices.py).

No GPU here: stand-in nodes (tests/gpu_nodes.py) under NVIDIA's and ROCm's
names, in a directory that NSPROVISIONER_DEVICE_ROOT points detection at.
Root makes them with mknod; the rootless pass uses the ones
scripts/test-all.sh made (NSPROV_TEST_GPU_NODES), so it binds them too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from nsprovisioner import SandboxError, SandboxSpec
from nsprovisioner.cgroupfs import V1_CONTROLLERS
from nsprovisioner.devices import DEVICE_ROOT_ENV, HostGpus, choose_gpus
from nsprovisioner.doctor import HostFacts, _gpu_facts, check_gpus
from nsprovisioner.mounts import PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READONLY

from .conftest import execute_ok, run
from .gpu_nodes import LAYOUTS, is_prepared, make_nodes
from .test_boundary import probe
from .test_provisioner import write_kernelspec

pytestmark = pytest.mark.timeout(120)
PREPARED_ENV = "NSPROV_TEST_GPU_NODES"
ALL_NODES = sorted(LAYOUTS["full"])
GPU_NODES = sorted(n for n in ALL_NODES if n != "fuse")

LIST_DEV = """
def tree(top):
    return sorted(os.path.relpath(os.path.join(d, f), top)
                  for d, _, files in os.walk(top) for f in files
                  if not os.path.islink(os.path.join(d, f)))
out["dev"] = [p for p in tree("/dev") if not p.startswith(("pts/", "shm/"))]
out["env"] = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")}
out["ino"] = {p: os.stat("/dev/" + p).st_ino for p in out["dev"]}
"""
USE_NODES = """
with open("/dev/nvidiactl", "rb") as f:
    out["read"] = f.read(4).hex()
with open("/dev/nvidia1", "wb") as f:
    out["wrote"] = f.write(b"kernel")
"""


@pytest.fixture(scope="session")
def gpu_nodes() -> Iterator[Path]:
    """The stand-in layouts: made here as root, or prepared by root for the rootless pass."""
    prepared = os.environ.get(PREPARED_ENV)
    if prepared:
        assert is_prepared(prepared), f"{PREPARED_ENV}={prepared} lacks the stand-in nodes"
        yield Path(prepared)
        return
    if os.geteuid() != 0:
        pytest.skip(f"stand-in nodes need mknod as root; scripts/test-all.sh makes them "
                    f"for the rootless pass ({PREPARED_ENV})")
    # in the host's /dev: a devtmpfs, never mounted nodev, and unseen by any sandbox
    top = tempfile.mkdtemp(prefix="nsprov-gpu-test.", dir="/dev")
    try:
        yield Path(make_nodes(top))
    finally:
        shutil.rmtree(top)


@pytest.fixture
def full(gpu_nodes: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = gpu_nodes / "full"
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(root))
    return root


def host_inodes(root: Path) -> dict[str, int]:
    return {name: os.stat(root / name).st_ino for name in ALL_NODES}


def test_no_device_is_bound_without_the_options(full: Path, no_leaks: None) -> None:
    r = probe(SandboxSpec(), LIST_DEV)
    assert r["dev"] == ["full", "null", "random", "tty", "urandom", "zero"]
    assert r["env"] == {"CUDA_VISIBLE_DEVICES": None, "ROCR_VISIBLE_DEVICES": None}


def test_all_gpus_bind_each_stacks_nodes_usable_inside(full: Path, no_leaks: None) -> None:
    r = probe(SandboxSpec(gpus="all"), LIST_DEV, USE_NODES)
    assert [p for p in r["dev"] if p not in ("full", "null", "random", "tty", "urandom",
                                             "zero")] == GPU_NODES
    # bound, not made: the host's very nodes
    assert {p: r["ino"][p] for p in GPU_NODES} == {
        p: i for p, i in host_inodes(full).items() if p in GPU_NODES}
    assert r["read"] == "00000000" and r["wrote"] == 6


def test_only_the_chosen_gpu_appears(full: Path, no_leaks: None) -> None:
    r = probe(SandboxSpec(gpus=[1]), LIST_DEV)
    gpus = [p for p in r["dev"] if p.startswith(("nvidia", "dri/", "kfd"))]
    assert "nvidia1" in gpus and "dri/renderD129" in gpus and "kfd" in gpus
    assert "nvidia0" not in gpus and "dri/renderD128" not in gpus
    assert "nvidiactl" in gpus and "nvidia-uvm" in gpus


def test_a_device_is_bound_at_the_same_path(full: Path, no_leaks: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ROOT_ENV, f"{full}/")
    r = probe(SandboxSpec(devices=["/dev/fuse", "/dev/nvidia-caps/*"]), LIST_DEV)
    assert [p for p in r["dev"] if p in ALL_NODES] == [
        "fuse", "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2"]
    assert r["env"] == {"CUDA_VISIBLE_DEVICES": None, "ROCR_VISIBLE_DEVICES": None}


def test_cli_sets_the_visible_devices_to_the_gpus_inside(full: Path, tmp_path: Path) -> None:
    script = ("import json, os; print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), "
              "os.environ.get('ROCR_VISIBLE_DEVICES'), sorted(os.listdir('/dev/dri'))]))")
    for gpus, expected in (("all", ["0,1", "0,1", ["renderD128", "renderD129"]]),
                           ("1", ["0", "0", ["renderD129"]])):
        r = subprocess.run([sys.executable, "-m", "nsprovisioner.cli", "run", "--gpus", gpus,
                            "--", sys.executable, "-c", script], capture_output=True,
                           text=True, cwd=tmp_path, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == expected


def test_a_missing_gpu_index_names_what_the_host_has(full: Path, no_leaks: None) -> None:
    with pytest.raises(SandboxError) as e:
        probe(SandboxSpec(gpus=[0, 5]), LIST_DEV)
    message = str(e.value)
    assert "GPU 5" in message and "NVIDIA GPUs 0, 1" in message
    assert f"{full}/nvidia1" in message and "strict" in message


def test_a_missing_device_names_it(full: Path, no_leaks: None) -> None:
    with pytest.raises(SandboxError, match=r"/dev/nvidia7 .*the host has NVIDIA GPUs 0, 1"):
        probe(SandboxSpec(devices=["/dev/nvidia7"]), LIST_DEV)


def test_a_missing_driver_node_fails_naming_it(gpu_nodes: Path, no_leaks: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = gpu_nodes / "no-uvm"
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(root))
    with pytest.raises(SandboxError, match=f"(?s){root}/nvidia-uvm.*nvidia-modprobe"):
        probe(SandboxSpec(gpus="all"), LIST_DEV)


def test_not_strict_warns_and_binds_what_exists(full: Path, no_leaks: None,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nsprovisioner.devices"):
        r = probe(SandboxSpec(gpus=[1, 5], strict=False), LIST_DEV)
    assert "GPU 5" in caplog.text
    assert "nvidia1" in r["dev"] and r["env"]["CUDA_VISIBLE_DEVICES"] is None


def test_a_device_the_sandbox_could_replace_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    # any file will do: the writable path is refused before the node is looked at
    (tmp_path / "fuse").write_text("")
    os.symlink("/dev/null", tmp_path / "link")
    monkeypatch.setenv(DEVICE_ROOT_ENV, str(tmp_path))
    with pytest.raises(SandboxError, match="the sandbox can write"):
        probe(SandboxSpec(devices=["/dev/fuse"], readwrite_paths=[str(tmp_path)]), LIST_DEV)
    with pytest.raises(SandboxError, match="the sandbox can write"):
        probe(SandboxSpec(devices=["/dev/fuse"], readwrite_paths=[],
                          readonly_root=False, private_tmp=False), LIST_DEV)
    with pytest.raises(SandboxError, match="outside"):
        probe(SandboxSpec(devices=["/dev/link"], readwrite_paths=[]), LIST_DEV)
    with pytest.raises(SandboxError, match="not a character device"):
        probe(SandboxSpec(devices=["/dev/fuse"], readwrite_paths=[]), LIST_DEV)


@pytest.mark.parametrize("key, value", [
    ("gpus", "some"), ("gpus", [0, 0]), ("gpus", [-1]), ("gpus", [True]), ("gpus", "0,x"),
    ("devices", ["/etc/passwd"]), ("devices", ["/dev/../etc/passwd"]), ("devices", "/dev/kfd"),
])
def test_bad_device_options_are_refused(key: str, value: Any) -> None:
    with pytest.raises(SandboxError, match=key):
        SandboxSpec(**{key: value})


def test_gpu_indices_are_read_as_on_the_command_line() -> None:
    assert SandboxSpec(gpus="1,0").gpus == (0, 1)
    assert SandboxSpec(gpus=[2]).gpus == (2,)
    assert SandboxSpec(gpus="all").gpus == "all"


def test_the_proc_masks_leave_the_driver_directory_alone(no_leaks: None) -> None:
    # the NVIDIA driver's user-space libraries read /proc/driver/nvidia
    assert not any(name.split("/")[0] == "driver"
                   for name in (*PROC_MASKED_FILES, *PROC_MASKED_DIRS, *PROC_READONLY))
    r = probe(SandboxSpec(), 'out["driver"] = sorted(os.listdir("/proc/driver"))')
    assert r["driver"] == sorted(os.listdir("/proc/driver"))


def test_doctor_lists_the_gpus_and_nodes(full: Path) -> None:
    facts = HostFacts()
    _gpu_facts(facts)
    detail = check_gpus(facts)[0].detail
    assert "NVIDIA GPUs 0, 1" in detail and "AMD ROCm GPUs 0-1" in detail
    assert f"{full}/nvidia-uvm" in detail and f"{full}/dri/renderD129" in detail


def test_a_kernel_gets_its_gpu_and_matching_environment(
        full: Path, tmp_path: Path, no_leaks: None) -> None:
    kernels = tmp_path / "kernels"
    write_kernelspec(kernels, "gpu1", provisioner="namespace", config={"gpus": [1]})
    (tmp_path / "runtime").mkdir()
    km = AsyncKernelManager(kernel_name="gpu1",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
                            connection_file=str(tmp_path / "runtime" / f"k-{uuid.uuid4()}.json"))

    async def check() -> str:
        await km.start_kernel(cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=30)
            return await execute_ok(kc, textwrap.dedent("""
                import json, os
                print(json.dumps([os.environ.get(k) for k in (
                    "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_CACHE_PATH",
                    "XDG_CACHE_HOME")] + [sorted(n for n in os.listdir("/dev")
                                                 if n.startswith("nvidia"))]))
            """))
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    cuda, rocr, cuda_cache, cache, nodes = json.loads(run(check()))
    assert (cuda, rocr) == ("0", "0")
    assert nodes == ["nvidia-caps", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools",
                     "nvidia1", "nvidiactl"]
    # CUDA's JIT cache in the sandbox's state, not home's read-only ~/.nv
    assert cuda_cache == os.path.join(cache, "nv")


def test_the_host_devices_cgroup_stays_in_charge() -> None:
    # on v1 a kernel never leaves its server's devices cgroup (nor gets a
    # device filter of its own on v2: nothing here attaches BPF programs)
    assert "devices" not in V1_CONTROLLERS


def test_each_stack_gets_its_nodes_and_only_its_variable() -> None:
    intel = HostGpus("/dev", render=("dri/renderD128", "dri/renderD129"))
    choice = choose_gpus([1], intel)
    assert (choice.nodes, choice.env, choice.missing) == (["dri/renderD129"], {}, [])
    mixed = HostGpus("/dev", nvidia=(0, 1), nvidia_shared=("nvidiactl", "nvidia-uvm"),
                     kfd=True, render=("dri/renderD128",))
    assert choose_gpus([1], mixed).missing == ["GPU 1"]  # no second AMD GPU
    choice = choose_gpus([0], mixed)
    assert choice.nodes == ["nvidia0", "nvidiactl", "nvidia-uvm", "dri/renderD128", "kfd"]
    assert choice.env == {"CUDA_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0"}
    assert choose_gpus("all", HostGpus("/dev")).missing == ["gpus = all: no GPU node found"]
