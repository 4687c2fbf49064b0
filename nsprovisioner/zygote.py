"""The program a pooled kernel's sandbox runs (pooled_kernel.py): a kernel started ahead.

It runs as `<kernel's python> -c <this file's source> MODULE ARGS`, in the
sandbox and with the environment a kernel started now would get, ARGS being
the kernelspec's with the pool's own connection file (key and ipc sockets the
server made for this kernel alone). It needs nothing but the standard library:
the kernel's Python may not have nsprovisioner installed. It starts the kernel
as `python -m MODULE ARGS` would (sys.path, sys.argv and __main__ as -m sets
them, stdin /dev/null), and a side thread says "ready" on the pool's socket
(the fd it got as stdin) once the kernel's event loop runs: sockets bound,
heartbeat up. The thread then waits for the one request it will ever get and
makes the running kernel the one that request would have started: its
environment (JPY_SESSION_NAME and what ipykernel derives from it: __session__),
argv and /proc/self/cmdline and environ (prctl(PR_SET_MM_MAP), which needs no
privilege; a kernel that can't do it says so instead of "ready", and the pool
gives up), the app's connection file path; then it acknowledges and ends. An
empty request (the pool discarding it) ends the kernel.

Nothing of a notebook's runs before the hand-out. A kernel whose init ran code
in its user namespace (startup files, exec_lines, PYTHONSTARTUP, extensions)
would have run it without the session's environment: it says so instead of
"ready" and the pool gives up on its kernelspec.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import runpy
import socket
import sqlite3
import sys
import threading
import time
import traceback
from typing import Any

READY = b"ready"
CANT_SHOW_AS = b"no-mm-map"
RAN_STARTUP_CODE = b"startup-code:"
HANDED_OUT = b"handed-out"
PR_SET_MM, PR_SET_MM_MAP = 35, 14


class MmMap(ctypes.Structure):
    """struct prctl_mm_map (linux/prctl.h)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (  # type: ignore[assignment]
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
        "start_stack", "arg_start", "arg_end", "env_start", "env_end")] + [
        ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


def show_as(argv: list[str], environ: list[str]) -> bool:
    """Point /proc/self/cmdline and /proc/self/environ at copies of `argv` and
    `environ` (kept for good: never freed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]

    def block(strings: list[str]) -> tuple[int, int]:
        data = b"".join(s.encode("utf-8", "surrogateescape") + b"\0" for s in strings)
        address = libc.malloc(len(data))
        if not address:
            raise MemoryError
        ctypes.memmove(address, data, len(data))
        return address, address + len(data)

    with open("/proc/self/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()

    def field(n: int) -> int:  # proc(5)'s numbering
        return int(fields[n - 3])

    arg_start, arg_end = block(argv)
    env_start, env_end = block(environ)
    mm = MmMap(start_code=field(26), end_code=field(27), start_data=field(45),
               end_data=field(46), start_brk=field(47), brk=libc.sbrk(0),
               start_stack=field(28), arg_start=arg_start, arg_end=arg_end,
               env_start=env_start, env_end=env_end, auxv=None, auxv_size=0,
               exe_fd=0xFFFFFFFF)
    done: int = libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(mm), ctypes.sizeof(mm), 0)
    return done == 0


def proc_strings(name: str) -> list[str]:
    with open(f"/proc/self/{name}", "rb") as f:
        return [s.decode("utf-8", "surrogateescape") for s in f.read().split(b"\0")[:-1]]


def receive(channel: socket.socket) -> bytes:
    chunks = []
    while chunk := channel.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def startup_code(app: Any) -> str | None:
    """What the app would have run in the user namespace while it initialized,
    with this process's environment instead of the session's: a kernel that ran
    any is not handed out (the pool gives up on its kernelspec)."""
    for name in ("exec_lines", "exec_files", "code_to_run", "file_to_run", "module_to_run",
                 "extensions"):
        if getattr(app, name, None):
            return f"IPKernelApp.{name}"
    startup_dir = getattr(getattr(app, "profile_dir", None), "startup_dir", None)
    if startup_dir and os.path.isdir(startup_dir) and any(
            n.endswith((".py", ".ipy")) for n in os.listdir(startup_dir)):
        return f"startup files in {startup_dir}"
    if getattr(app, "exec_PYTHONSTARTUP", False) and os.environ.get("PYTHONSTARTUP"):
        return "PYTHONSTARTUP"
    return None


def running_app() -> Any:
    """The kernel's IPKernelApp once its event loop runs (a callback ran on it)."""
    while True:
        # (polled: the main thread may be importing the module right now)
        cls = getattr(sys.modules.get("ipykernel.kernelapp"), "IPKernelApp", None)
        app = cls.instance() if cls is not None and cls.initialized() else None
        loop = getattr(app, "io_loop", None)
        if loop is not None:
            break
        time.sleep(0.005)
    started = threading.Event()
    loop.add_callback(started.set)  # tornado: safe from another thread
    started.wait()
    return app


def replace(items: list[str], old: str, new: str) -> list[str]:
    return [new if item == old else item for item in items]


def hand_out(app: Any, request: dict[str, Any], before: dict[str, str], own_file: str) -> None:
    """Make the running kernel the one the request would have started: what it
    read at start from its environment, argv and connection file's path."""
    os.chdir(request["cwd"])  # the same directory: the pool was made for it
    # what the kernel's imports and init did to the environment (MPLBACKEND,
    # debugpy's variable) they would have done to the requested one
    changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
    removed = set(before) - set(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(changed)
    for name in removed:
        os.environ.pop(name, None)
    connection_file = request["connection_file"]
    show_as(request["cmdline"], request["environ"])
    sys.orig_argv = list(request["cmdline"])
    sys.argv[1:] = request["args"]
    app.connection_file = connection_file
    app.argv = replace(list(app.argv), own_file, connection_file)
    app.extra_args = replace(list(app.extra_args), own_file, connection_file)
    for config in (app.config, getattr(app, "cli_config", {})):
        section = config.get("IPKernelApp", {}) if "IPKernelApp" in config else {}
        if section.get("connection_file") == own_file:
            section["connection_file"] = connection_file
    session = os.environ.get("JPY_SESSION_NAME")
    shell = getattr(app.kernel, "shell", None)
    if session and shell is not None:  # ipkernel.py sets it at init
        shell.user_ns["__session__"] = session
    history: Any = getattr(shell, "history_manager", None)
    db = getattr(history, "db", None)
    if isinstance(db, sqlite3.Connection) and getattr(history, "session_number", None):
        try:  # the IPython session starts now, as a fresh kernel's would
            with db:
                db.execute("UPDATE sessions SET start=? WHERE session=?",
                           (datetime.datetime.now().isoformat(" "), history.session_number))
        except sqlite3.Error:
            pass  # history off or locked: only its start time differs


def serve(channel: socket.socket, before: dict[str, str], own_file: str) -> None:
    """The side thread: "ready" once the kernel runs, then the one request."""
    try:
        app = running_app()
        why = startup_code(app)
        if why is not None:
            channel.sendall(RAN_STARTUP_CODE + why.encode())
            os._exit(0)
        channel.sendall(READY)
        data = receive(channel)
        if not data:
            os._exit(0)  # the pool discards this kernel
        hand_out(app, json.loads(data), before, own_file)
        channel.sendall(HANDED_OUT)
    except BaseException:  # noqa: BLE001 - a kernel half-handed-out must not live on
        traceback.print_exc(file=sys.__stderr__)
        os._exit(1)
    finally:
        channel.close()


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    own_file = args[args.index("-f") + 1] if "-f" in args else ""
    channel = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # a kernel's stdin
    os.close(devnull)
    # the same strings again: whether this kernel lets us change them at all
    if not show_as(proc_strings("cmdline"), proc_strings("environ")):
        channel.sendall(CANT_SHOW_AS)
        sys.exit(0)
    before = dict(os.environ)
    threading.Thread(target=serve, args=(channel, before, own_file), daemon=True,
                     name="nsprovisioner-pool").start()
    # as `python -m MODULE ARGS` has it: -c put '' first, -m puts the cwd
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
