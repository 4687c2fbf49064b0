"""network = "none": the per-kernel directory of the kernel's ipc sockets.

A kernel in its own network namespace can't reach Jupyter over loopback TCP,
so its manager switches to zmq's ipc transport: Unix sockets in a directory
that is bind-mounted at the same path inside the sandbox. Every kernel's
directory lives under one parent that all sandboxes get hidden, so a kernel
sees its own sockets and no other kernel's (connect() works through a
read-only mount, so visibility is what matters).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from .errors import SandboxError
from .sandbox import SandboxSpec

# zmq's limit for an ipc endpoint path (sockaddr_un.sun_path less the NUL);
# jupyter_client appends "-<port>", ports being small integers for ipc.
MAX_SOCKET_PATH = 107
PORT_SUFFIX = len("-65535")


def sockets_parent() -> str:
    """The directory all of this user's kernels' socket directories are made in.

    $XDG_RUNTIME_DIR when there is one (short, per user, tmpfs), else the
    temporary directory; either way a 0700 nsprov-<uid> directory in it.
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
        base = tempfile.gettempdir()
    parent = os.path.join(os.path.realpath(base), f"nsprov-{os.geteuid()}")
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(parent)
    if not os.path.isdir(parent) or os.path.islink(parent) or st.st_uid != os.geteuid():
        raise SandboxError(f"{parent} is not a directory of yours: remove it, or set "
                           "XDG_RUNTIME_DIR to a directory of your own")
    os.chmod(parent, 0o700)
    return parent


def make_socket_dir(kernel_id: str) -> str:
    """A new 0700 directory for one kernel's sockets; SandboxError if paths get too long."""
    parent = sockets_parent()
    directory = tempfile.mkdtemp(prefix=f"{kernel_id[:8]}-", dir=parent)
    endpoint = os.path.join(directory, "k")
    if len(endpoint) + PORT_SUFFIX > MAX_SOCKET_PATH:
        shutil.rmtree(directory, ignore_errors=True)
        raise SandboxError(
            f"network 'none' needs ipc socket paths of at most {MAX_SOCKET_PATH} bytes, but "
            f"{endpoint}-N is longer (a zmq limit)",
            hint="set XDG_RUNTIME_DIR or TMPDIR to a shorter directory, e.g. /tmp")
    return directory


def endpoint(directory: str) -> str:
    """What the kernel manager's `ip` becomes: sockets are <endpoint>-<port>."""
    return os.path.join(directory, "k")


def expose_only(spec: SandboxSpec, directory: str) -> SandboxSpec:
    """`spec` with every kernel's socket directory hidden except `directory`, writable."""
    parent = os.path.dirname(directory)
    hidden = [*spec.hidden_paths] + ([] if parent in spec.hidden_paths else [parent])
    return dataclasses.replace(spec, hidden_paths=hidden,
                               readwrite_paths=[*spec.readwrite_paths, directory])


def remove_socket_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
