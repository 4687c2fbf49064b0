"""A pooled kernel: what it is made for, how it starts, how it is handed out.

A pooled kernel is a RUNNING kernel in its own sandbox, started by zygote.py
with a connection file of the pool's own (ipc sockets in its socket dir, a key
the server made for it alone). At hand-out a side thread in the kernel takes
the request's environment, argv and connection file path (zygote.py), and
launch_kernel() returns the pooled kernel's connection info, which
jupyter_client adopts: it rewrites the requested connection file with it.

It is made for one Target: the interpreter, module and arguments, the cwd (its
`{cwd}` bind), the environment but for JPY_SESSION_NAME, the runtime dirs it
hides. A kernel is never handed out for a request it was not made for.

The runtime dir that holds connection files is hidden in a sandbox. So a
pooled sandbox gets, at the runtime dir's path, a read-only bind of a
directory of its own beside its socket dir (unlistable, as the hidden dir is)
holding the pool's connection file; at hand-out the server renames it to the
requested file's name, and it shows at that path, read-only, as in a fresh
sandbox. A pooled kernel has seen no session, no notebook's code: a kernel
whose init would run code in its user namespace says so and is not pooled.

The pools that keep these kernels are pool.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.connect import write_connection_file

from .ipcdir import endpoint as socket_endpoint
from .ipcdir import expose_only, make_socket_dir, remove_socket_dir, remove_tree
from .jupyter_log import warnings_of_launch
from .kernelsandbox import hide_runtime_dirs
from .mounts import PathPins
from .process import SandboxProcess
from .sandbox import SandboxSpec, check_env
from .spawn import PIPE, command_env, spawn
from .zygote import HANDED_OUT  # its answer to the request (the protocol is declared there)

# The kernel modules a pooled sandbox can become (the argv `python -m MODULE ...`).
MODULES = ("ipykernel_launcher", "ipykernel")
# Stands for the connection file in a Target's args.
CONNECTION_FILE = "{connection_file}"
# Set per request, read by the kernel only once it runs: not part of a Target.
LATE_ENV = frozenset({"JPY_SESSION_NAME"})
HAND_OUT_WAIT = 5.0  # seconds the answer may take at most (it takes well under 1 ms)
RUNTIME_SUFFIX = ".pool-runtime"  # a waiting kernel's runtime dir
HANDED_OUT_SUFFIX = ".kernel-runtime"  # renamed at hand-out (the bind inside follows)
ZYGOTE_SOURCE = (Path(__file__).parent / "zygote.py").read_text()


@dataclasses.dataclass(frozen=True)
class Target:
    """What a pooled kernel was made for; it serves only a request with the same."""

    python: str
    module: str
    args: tuple[str, ...]  # after `-m MODULE`, the connection file as CONNECTION_FILE
    kernel_name: str  # the connection file's kernel_name
    cwd: str
    env: tuple[tuple[str, str], ...]  # sorted, without LATE_ENV
    connection_dir: str  # real path; hidden in a fresh sandbox
    hidden_dirs: tuple[str, ...]  # the other runtime dirs a fresh sandbox hides
    spec: SandboxSpec  # the kernelspec's sandbox, before runtime dirs and sockets


def request_target(spec: SandboxSpec, cmd: Sequence[str], env: Mapping[str, str], cwd: str,
                   connection_file: str, runtime_dirs: Sequence[str],
                   relayed: bool, kernel_name: str, encrypted: bool) -> Target | None:
    """The Target of a launch, or None when no pooled kernel could be it (its
    output isn't relayed to the log, CurveZMQ keys a pooled kernel lacks, not a
    `python -m ipykernel...` command with the connection file as an argument)."""
    if not relayed or encrypted or len(cmd) < 4 or cmd[1] != "-m" or cmd[2] not in MODULES:
        return None
    if connection_file not in cmd[3:] or not os.path.isabs(cmd[0]):
        return None
    connection_dir = os.path.realpath(os.path.dirname(connection_file))
    fresh = hide_runtime_dirs(spec, runtime_dirs)
    if connection_dir not in fresh.hidden_paths:
        return None  # a shared dir (/tmp) that a fresh sandbox doesn't hide
    others = tuple(sorted(p for p in fresh.hidden_paths
                          if p not in spec.hidden_paths and p != connection_dir))
    full_env = command_env(spec, env)
    args = tuple(CONNECTION_FILE if a == connection_file else a for a in cmd[3:])
    return Target(python=cmd[0], module=cmd[2], args=args, kernel_name=kernel_name,
                  cwd=os.path.abspath(cwd),
                  env=tuple(sorted((k, v) for k, v in full_env.items() if k not in LATE_ENV)),
                  connection_dir=connection_dir, hidden_dirs=others, spec=spec)


class PooledKernel:
    """A running kernel waiting in its sandbox: its init, the zygote's socket, its
    connection info (ipc sockets in its socket dir, a key of its own) and its
    directories."""

    def __init__(self, name: str, target: Target, proc: SandboxProcess, channel: socket.socket,
                 socket_dir: str, runtime_dir: str, pins: PathPins,
                 connection_info: dict[str, Any], own_file: str) -> None:
        self.name = name
        self.connection_info = connection_info
        self.own_file = own_file  # its connection file, in runtime_dir
        self.warnings: list[str] = []  # what its sandbox's start left out (strict = false)
        self.target = target
        self.proc = proc
        self.channel = channel
        self.socket_dir = socket_dir
        self.runtime_dir = runtime_dir
        self.pins = pins
        self.ready = False
        self.started = time.monotonic()

    async def hand_out(self, connection_file: str, env: Mapping[str, str],
                       cmd: Sequence[str]) -> None:
        """Show the kernel's connection file at the requested path in the sandbox,
        make the running kernel the requested one; OSError when it didn't answer."""
        handed_out = self.runtime_dir[:-len(RUNTIME_SUFFIX)] + HANDED_OUT_SUFFIX
        os.rename(self.runtime_dir, handed_out)
        self.runtime_dir = handed_out
        own_file = os.path.join(self.runtime_dir, os.path.basename(self.own_file))
        os.chmod(self.runtime_dir, 0o700)
        try:
            os.rename(own_file, os.path.join(self.runtime_dir, os.path.basename(connection_file)))
        finally:
            os.chmod(self.runtime_dir, 0o111)  # as the fresh sandbox's hidden dir: no listing
        request = json.dumps({"cwd": self.target.cwd, "env": dict(env), "args": list(cmd[3:]),
                              "cmdline": list(cmd), "environ": check_env(dict(env)),
                              "connection_file": connection_file}).encode()
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self.channel, request)
            self.channel.shutdown(socket.SHUT_WR)
            answer = await asyncio.wait_for(loop.sock_recv(self.channel, 64), HAND_OUT_WAIT)
        except asyncio.TimeoutError:
            raise OSError(f"no answer in {HAND_OUT_WAIT:.0f} s") from None
        finally:
            self.channel.close()
        if answer != HANDED_OUT:
            raise OSError(f"it answered {answer!r}")

    def remove_runtime_dir(self) -> None:
        remove_tree(self.runtime_dir)

    async def reap(self, keep_socket_dir: bool) -> None:
        """Once killed: wait for its init, then remove its files."""
        await self.proc.wait()
        self.proc.close_pipes()
        self.remove_runtime_dir()
        if not keep_socket_dir:
            remove_socket_dir(self.socket_dir)

    def kill_now(self) -> None:
        """Without an event loop (at exit, or the loop is gone): kill, reap and remove
        synchronously."""
        self.channel.close()
        self.proc.kill_now()
        self.remove_runtime_dir()
        remove_socket_dir(self.socket_dir)


async def start_pooled_kernel(target: Target) -> PooledKernel:
    """A new kernel for `target`, in its own sandbox; it says "ready" on its
    channel once its imports and init are done (zygote.py)."""
    name = f"pool{secrets.token_hex(6)}"
    socket_dir = make_socket_dir(name)
    runtime_dir = socket_dir + RUNTIME_SUFFIX
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.mkdir(runtime_dir, 0o700)
        spec = hide_runtime_dirs(target.spec, target.hidden_dirs)
        spec = dataclasses.replace(
            spec, readonly_paths=(*spec.readonly_paths, target.connection_dir))
        spec = expose_only(spec, socket_dir)
        # its connection file, shown at the runtime dir's path inside: ipc sockets
        # in its socket dir and a key of its own, that no session has seen
        own_file = os.path.join(runtime_dir, f"kernel-{name}.json")
        _, written = write_connection_file(
            own_file, ip=socket_endpoint(socket_dir), key=str(uuid.uuid4()).encode(),
            transport="ipc", signature_scheme="hmac-sha256", kernel_name=target.kernel_name)
        os.chmod(runtime_dir, 0o111)  # unlistable, as a fresh sandbox's hidden runtime dir
        info: dict[str, Any] = dict(written)
        info["key"] = info["key"].encode()  # as KernelManager.get_connection_info has it
        inside = os.path.join(target.connection_dir, os.path.basename(own_file))
        pins = PathPins()
        argv = [target.python, "-c", ZYGOTE_SOURCE, target.module,
                *(inside if a == CONNECTION_FILE else a for a in target.args)]
        with warnings_of_launch() as left_out:
            proc = await spawn(spec, argv, env=dict(target.env), cwd=target.cwd,
                               stdin=theirs.fileno(), stdout=PIPE, stderr=PIPE,
                               name=name, path_pins=pins,
                               network_before_exec=False,
                               bind_sources={target.connection_dir: runtime_dir})
    except BaseException:
        ours.close()
        remove_tree(runtime_dir)
        remove_socket_dir(socket_dir)
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    kernel = PooledKernel(name, target, proc, ours, socket_dir, runtime_dir, pins, info,
                          own_file)
    kernel.warnings = list(left_out)
    return kernel
