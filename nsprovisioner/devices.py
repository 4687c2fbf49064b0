"""Which host device nodes a sandbox gets in its /dev: the `devices` and `gpus` options.

The sandbox's /dev is its own tmpfs (mounts.py); the nodes chosen here are
bound into it at the same path, never created (mknod needs real root, and a
node of our own would bypass the host's permissions on its original). What a
GPU stack needs is detected from the host's /dev:

- NVIDIA: /dev/nvidia<N> for each chosen GPU, and the nodes every CUDA
  process opens: nvidiactl and nvidia-uvm (required), nvidia-uvm-tools,
  nvidia-modeset and nvidia-caps/* (when the host has them);
- AMD ROCm: /dev/kfd and the chosen GPUs' /dev/dri/renderD* nodes;
- Intel (and other DRM drivers): the chosen /dev/dri/renderD* nodes.

GPU index N is /dev/nvidia<N> for NVIDIA and the Nth render node in minor
order for the others (render nodes of the NVIDIA driver belong to the
NVIDIA GPUs and are left out). Inside, as in a container, a stack sees only
the GPUs whose nodes it can open, numbered from 0 in the host's order, so
CUDA_VISIBLE_DEVICES and ROCR_VISIBLE_DEVICES name 0..k-1.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import SandboxError

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

log = logging.getLogger(__name__)

# Test-only (docs/configuration.md): the host directory that stands for /dev
# when devices and GPUs are looked up, so that tests can bind stand-in nodes
# on a machine without a GPU. Each node still goes through every check below.
DEVICE_ROOT_ENV = "NSPROVISIONER_DEVICE_ROOT"
NVIDIA_REQUIRED = ("nvidiactl", "nvidia-uvm")
NVIDIA_OPTIONAL = ("nvidia-uvm-tools", "nvidia-modeset")
# what the sandbox's /dev holds of its own (mounts.py), which no device may cover
OWN_DEV_ENTRIES = frozenset({"null", "zero", "full", "random", "urandom", "tty", "pts",
                             "shm", "fd", "stdin", "stdout", "stderr", "ptmx"})
_NVIDIA_GPU = re.compile(r"nvidia(\d+)")
_RENDER = re.compile(r"renderD(\d+)")


def device_root() -> str:
    """The host directory that is /dev for device lookups: /dev, unless a test says otherwise."""
    return os.path.normpath(os.environ.get(DEVICE_ROOT_ENV) or "/dev")


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _render_driver(name: str, root: str) -> str | None:
    """The kernel driver of a render node (amdgpu, i915, xe, nvidia), from sysfs;
    None when it can't be told (a stand-in root has no sysfs entries)."""
    if root != "/dev":
        return None
    try:
        return os.path.basename(os.readlink(f"/sys/class/drm/{name}/device/driver"))
    except OSError:
        return None


@dataclass(frozen=True)
class HostGpus:
    """The GPU nodes of the host, as names relative to the device root."""

    root: str
    nvidia: tuple[int, ...] = ()          # N of each /dev/nvidia<N>
    nvidia_shared: tuple[str, ...] = ()   # nvidiactl, nvidia-uvm, ..., nvidia-caps/*
    kfd: bool = False
    render: tuple[str, ...] = ()          # dri/renderD*, not the NVIDIA driver's, minor order

    @property
    def any(self) -> bool:
        return bool(self.nvidia or self.render)

    def describe(self) -> str:
        """What the host has, for errors and doctor."""
        parts = []
        if self.nvidia:
            nodes = ", ".join(f"{self.root}/nvidia{n}" for n in self.nvidia)
            shared = ", ".join(f"{self.root}/{n}" for n in self.nvidia_shared) or "none"
            parts.append(f"NVIDIA GPUs {', '.join(map(str, self.nvidia))} ({nodes}; shared "
                         f"nodes: {shared})")
        if self.render:
            stack = "AMD ROCm" if self.kfd else "DRM"
            nodes = ", ".join(f"{self.root}/{n}" for n in self.render)
            parts.append(f"{stack} GPUs 0-{len(self.render) - 1} ({nodes}"
                         f"{f', {self.root}/kfd' if self.kfd else ''})")
        elif self.kfd:
            parts.append(f"{self.root}/kfd but no render node")
        return "; ".join(parts) or f"no GPU nodes in {self.root}"


def detect_gpus(root: str | None = None) -> HostGpus:
    """The GPU nodes under the device root (only character devices count)."""
    root = root or device_root()
    try:
        names = os.listdir(root)
    except OSError:
        return HostGpus(root)
    nvidia = sorted(int(m.group(1)) for name in names
                    if (m := _NVIDIA_GPU.fullmatch(name))
                    and _is_char_device(os.path.join(root, name)))
    shared = [n for n in (*NVIDIA_REQUIRED, *NVIDIA_OPTIONAL)
              if _is_char_device(os.path.join(root, n))]
    caps = os.path.join(root, "nvidia-caps")
    if os.path.isdir(caps):
        shared += [f"nvidia-caps/{n}" for n in sorted(os.listdir(caps))
                   if _is_char_device(os.path.join(caps, n))]
    render: list[tuple[int, str]] = []
    dri = os.path.join(root, "dri")
    if os.path.isdir(dri):
        for name in os.listdir(dri):
            m = _RENDER.fullmatch(name)
            if (m and _is_char_device(os.path.join(dri, name))
                    and _render_driver(name, root) != "nvidia"):
                render.append((int(m.group(1)), f"dri/{name}"))
    return HostGpus(root, tuple(nvidia), tuple(shared),
                    _is_char_device(os.path.join(root, "kfd")),
                    tuple(name for _, name in sorted(render)))


@dataclass
class GpuChoice:
    """The nodes (relative to the device root) and environment of a `gpus` setting."""

    nodes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def choose_gpus(gpus: str | Sequence[int], host: HostGpus) -> GpuChoice:
    """What `gpus` ("none", "all" or indices) binds on this host, and what it lacks."""
    choice = GpuChoice()
    if gpus == "none":
        return choice
    if not host.any:
        choice.missing.append(f"gpus = {_show(gpus)}: no GPU node found")
        return choice
    if isinstance(gpus, str):  # "all"
        nvidia: list[int] = list(host.nvidia)
        render = list(host.render)
    else:
        indices = list(gpus)
        nvidia = [i for i in indices if i in host.nvidia]
        render = [host.render[i] for i in indices if i < len(host.render)]
        absent = [i for i in indices
                  if (host.nvidia and i not in host.nvidia)
                  or (host.render and i >= len(host.render))]
        if absent:
            choice.missing.append(f"GPU {', '.join(map(str, absent))}")
    if nvidia:
        choice.nodes += [f"nvidia{n}" for n in nvidia]
        choice.nodes += host.nvidia_shared
        choice.missing += [f"{host.root}/{n}" for n in NVIDIA_REQUIRED
                           if n not in host.nvidia_shared]
        choice.env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(len(nvidia))))
    if render:
        choice.nodes += render
        if host.kfd:
            choice.nodes.append("kfd")
            choice.env["ROCR_VISIBLE_DEVICES"] = ",".join(map(str, range(len(render))))
    return choice


def _show(gpus: str | Sequence[int]) -> str:
    return gpus if isinstance(gpus, str) else ",".join(map(str, gpus))


def gpu_env(spec: SandboxSpec) -> dict[str, str]:
    """The variables that tell CUDA and ROCm which of the bound GPUs to use."""
    if spec.gpus == "none":
        return {}
    return choose_gpus(spec.gpus, detect_gpus()).env


@dataclass(frozen=True)
class DeviceBind:
    """One host node and where it appears in the sandbox's /dev."""

    inside: str               # /dev/...
    source: str               # the host's real path
    identity: os.stat_result  # checked again by the bind itself


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _expand(entry: str, root: str) -> list[str]:
    """The host paths of a `devices` entry (/dev/... written relative to the root)."""
    host = root + entry[len("/dev"):]
    if glob.has_magic(host):
        return sorted(glob.glob(host))
    return [host] if os.path.lexists(host) else []


def plan_devices(spec: SandboxSpec,
                 sandbox_can_write: Callable[[str], bool]) -> list[DeviceBind]:
    """The nodes to bind, checked; SandboxError for a node the sandbox could have
    swapped, and for missing ones when strict (a warning otherwise)."""
    root = device_root()
    real_root = os.path.realpath(root)
    wanted: list[tuple[str, str]] = []  # (given /dev path, host path)
    missing: list[str] = []
    for entry in spec.devices:
        found = _expand(entry, root)
        if not found:
            missing.append(f"{entry} ({root}{entry[len('/dev'):]})")
        wanted += [("/dev" + path[len(root):], path) for path in found]
    host: HostGpus | None = None
    if spec.gpus != "none":
        host = detect_gpus(root)
        choice = choose_gpus(spec.gpus, host)
        missing += choice.missing
        wanted += [(f"/dev/{node}", os.path.join(root, node)) for node in choice.nodes]
    if missing:
        have = f"; the host has {(host or detect_gpus(root)).describe()}"
        report = f"device nodes missing: {'; '.join(missing)}{have}"
        if spec.strict:
            raise SandboxError(report, hint="fix devices/gpus for this host (`nsprovisioner "
                               "doctor` lists its GPUs), load the driver's modules (e.g. "
                               "nvidia-modprobe -u -c=0 for nvidia-uvm), or set strict = "
                               "false (--no-strict) to start without them")
        log.warning("starting the sandbox without some devices: %s", report)
    binds: dict[str, DeviceBind] = {}
    for inside, path in wanted:
        if inside not in binds:
            binds[inside] = _check_node(inside, path, real_root, sandbox_can_write)
    return list(binds.values())


def _check_node(inside: str, path: str, real_root: str,
                sandbox_can_write: Callable[[str], bool]) -> DeviceBind:
    name = inside[len("/dev/"):]
    if name.split("/")[0] in OWN_DEV_ENTRIES:
        raise SandboxError(f"devices entry {inside} is one of the sandbox's own /dev entries; "
                           "remove it")
    real = os.path.realpath(path)
    if not _within(real, real_root):
        raise SandboxError(f"device {inside} ({path}) resolves to {real}, outside "
                           f"{real_root}; name the node itself")
    if sandbox_can_write(real):
        raise SandboxError(f"device {inside} ({real}) lies in a path the sandbox can write, "
                           "so it could be replaced before the next start; keep device "
                           "nodes where the sandbox can't write (/dev)")
    st = os.stat(real)
    if not stat.S_ISCHR(st.st_mode):
        raise SandboxError(f"device {inside} ({real}) is not a character device; only "
                           "character devices can be bound into the sandbox")
    return DeviceBind(inside, real, st)
