"""The per-kernel directory of a sandboxed kernel's ipc sockets.

Every sandboxed kernel talks to Jupyter over zmq's ipc transport: Unix
sockets in a directory that is bind-mounted at the same path inside the
sandbox. Loopback TCP can't cross into a private network namespace, and
with the host's network any local process (another kernel, another user)
could subscribe to a kernel's iopub on its port: messages are signed, not
encrypted. Every kernel's directory lives under one 0700 parent that all
sandboxes get hidden, so a kernel sees its own sockets and no other kernel's
(connect() works through a read-only mount, so visibility is what matters).

Below the parent, each server has a directory named after its pid and start
time, holding its kernels' socket directories and a record of each kernel's
connection file. A server that starts removes what servers that died left
there: their sockets, and their kernels' connection files (with the keys).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import tempfile

from .cgroupfs import pid_namespace_id, process_start_time
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


SERVER_DIR_RE = re.compile(r"server-(\d+)-(\d+)-(\d+)")
RECORD_SUFFIX = ".connection-file"


def server_dir() -> str:
    """This process's directory below sockets_parent(), made if missing."""
    pid = os.getpid()
    started = process_start_time(pid)
    path = os.path.join(sockets_parent(), f"server-{pid}-{started}-{pid_namespace_id()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return path


def make_socket_dir(kernel_id: str) -> str:
    """A new 0700 directory for one kernel's sockets; SandboxError if paths get too long."""
    for _ in range(3):  # another thread's remove_socket_dir may take an empty server_dir
        try:
            directory = tempfile.mkdtemp(prefix=f"{kernel_id[:8]}-", dir=server_dir())
            break
        except FileNotFoundError:
            continue
    else:
        raise SandboxError(f"could not make a socket directory in {sockets_parent()}")
    endpoint = os.path.join(directory, "k")
    if len(endpoint) + PORT_SUFFIX > MAX_SOCKET_PATH:
        remove_socket_dir(directory)
        raise SandboxError(
            f"a sandboxed kernel needs ipc socket paths of at most {MAX_SOCKET_PATH} bytes, but "
            f"{endpoint}-N is longer (a zmq limit)",
            hint="set XDG_RUNTIME_DIR or TMPDIR to a shorter directory, e.g. /tmp")
    return directory


def endpoint(directory: str) -> str:
    """What the kernel manager's `ip` becomes: sockets are <endpoint>-<port>."""
    return os.path.join(directory, "k")


def expose_only(spec: SandboxSpec, directory: str) -> SandboxSpec:
    """`spec` with every kernel's socket directory hidden except `directory`, writable."""
    parent = os.path.dirname(os.path.dirname(directory))  # sockets_parent()
    hidden = [*spec.hidden_paths] + ([] if parent in spec.hidden_paths else [parent])
    return dataclasses.replace(spec, hidden_paths=hidden,
                               readwrite_paths=[*spec.readwrite_paths, directory])


def remove_tree(path: str) -> None:
    """shutil.rmtree, also through directories of ours that can't be listed (a pooled
    kernel's runtime dir is mode 0111, pooled_kernel.py), `path` itself included;
    other errors (a path that is gone) are ignored."""
    def listable(directory: str) -> bool:
        if not os.path.isdir(directory) or os.path.islink(directory):
            return False
        try:
            os.chmod(directory, 0o700)
        except OSError:
            return False
        return True

    def retry(func: object, failed: str, exc_info: object) -> None:
        # rmtree couldn't open or list it (or, so, remove it): make it ours to list
        if failed != path and listable(failed):
            shutil.rmtree(failed, ignore_errors=True)

    if listable(path):
        shutil.rmtree(path, onerror=retry)


def remove_socket_dir(directory: str) -> None:
    """The kernel's directory, its record, and the server's directory once empty."""
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.unlink(directory + RECORD_SUFFIX)
    except FileNotFoundError:  # the kernel never got a connection file
        pass
    try:
        os.rmdir(os.path.dirname(directory))
    except OSError:  # other kernels' directories remain
        pass


def record_connection_file(directory: str, connection_file: str) -> None:
    """Note the connection file of the kernel whose sockets are in `directory`, beside
    it (where the kernel can't write: only its own directory is visible inside)."""
    with open(directory + RECORD_SUFFIX, "w") as f:
        f.write(os.path.abspath(connection_file))


def _remove_connection_file(path: str, runtime_dir: str) -> bool:
    """Only a kernel connection file in Jupyter's runtime dir, whatever a record says."""
    name = os.path.basename(path)
    if (os.path.realpath(os.path.dirname(path)) != runtime_dir
            or not (name.startswith("kernel-") and name.endswith(".json"))):
        return False
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


def sweep_dead_servers(runtime_dir: str) -> list[str]:
    """Remove the socket directories and kernel connection files of this user's servers
    that died (pid gone or reused); the paths removed. Servers of another pid
    namespace are left alone: their pids mean nothing here."""
    parent = sockets_parent()
    runtime = os.path.realpath(runtime_dir)
    removed: list[str] = []
    pidns = pid_namespace_id()
    for entry in os.listdir(parent):
        m = SERVER_DIR_RE.fullmatch(entry)
        if not m or int(m[3]) != pidns:
            continue
        if process_start_time(int(m[1])) == int(m[2]):
            continue  # alive
        directory = os.path.join(parent, entry)
        for name in os.listdir(directory):
            if name.endswith(RECORD_SUFFIX):
                try:
                    with open(os.path.join(directory, name)) as f:
                        recorded = f.read().strip()
                except OSError:
                    continue
                if _remove_connection_file(recorded, runtime):
                    removed.append(recorded)
        remove_tree(directory)
        removed.append(directory)
    return removed
