"""Stand-in GPU device nodes, for tests on machines without a GPU.

Character devices with the numbers of /dev/null and /dev/zero under the names
NVIDIA's and ROCm's drivers use, made with mknod (root only) in a throw-away
directory that NSPROVISIONER_DEVICE_ROOT points detection at. Two layouts:
`full` (two NVIDIA GPUs, two AMD render nodes, every shared node) and
`no-uvm` (an NVIDIA GPU whose nvidia-uvm node is missing).

scripts/test-all.sh runs `python -m tests.gpu_nodes DIR` as root before the
rootless pass, whose tests then use DIR (NSPROV_TEST_GPU_NODES) instead of
making nodes they can't.
"""

from __future__ import annotations

import os
import stat
import sys

NULL = os.stat("/dev/null").st_rdev   # writes vanish, reads give EOF
ZERO = os.stat("/dev/zero").st_rdev   # reads give zeros
LAYOUTS = {
    "full": {"nvidia0": NULL, "nvidia1": NULL, "nvidiactl": ZERO, "nvidia-uvm": ZERO,
             "nvidia-uvm-tools": ZERO, "nvidia-modeset": ZERO,
             "nvidia-caps/nvidia-cap1": ZERO, "nvidia-caps/nvidia-cap2": ZERO,
             "kfd": ZERO, "dri/renderD128": NULL, "dri/renderD129": NULL,
             "fuse": ZERO},
    "no-uvm": {"nvidia0": NULL, "nvidiactl": ZERO},
}


def make_nodes(top: str) -> str:
    """Both layouts under `top`, readable and writable by everyone (as the real ones)."""
    os.chmod(top, 0o755)
    for layout, nodes in LAYOUTS.items():
        for name, rdev in nodes.items():
            path = os.path.join(top, layout, name)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mknod(path, 0o666 | stat.S_IFCHR, rdev)
            os.chmod(path, 0o666)
    return top


def is_prepared(top: str) -> bool:
    return all(stat.S_ISCHR(os.stat(os.path.join(top, layout, name)).st_mode)
               for layout, nodes in LAYOUTS.items() for name in nodes)


if __name__ == "__main__":
    make_nodes(sys.argv[1])
