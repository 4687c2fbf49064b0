"""The program a pooled kernel's sandbox runs while it waits (pool.py).

It runs as `<kernel's python> -c <this file's source> MODULE AHEAD`, in the
sandbox and with the environment a kernel started now would get, so it needs
nothing but the standard library: the kernel's Python may not have
nsprovisioner installed. It imports what `python -m MODULE` would import
while it starts (AHEAD, comma-separated: ipykernel and its dependencies,
nearly all of a kernel's start), says
"ready" on its stdin, a socket, and waits there for the one request it will ever
get: the kernel's cwd, environment and arguments. It then becomes the kernel
as `python -m MODULE ARGS` would have run it: sys.path, sys.argv and __main__
as -m sets them, its stdin /dev/null as a kernel's is, and /proc/self/cmdline
and /proc/self/environ what the kernel's exec would have left there
(prctl(PR_SET_MM_MAP), which needs no privilege; a zygote that can't do it
says so instead of "ready", and the pool gives up: a kernel that shows
another command line is not handed out). An empty request (the pool shutting it
down) ends it.

Nothing here may run code of a notebook's, nor import from the cwd:
ipykernel_launcher takes the cwd off sys.path while it imports, and so does
this program.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

READY = b"ready"
CANT_SHOW_AS = b"no-mm-map"
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


def warm_parser() -> None:
    """ipykernel's first tens of ms go to argparse compiling its patterns (re's
    cache): parse a command line of a kernel's shape into a throwaway app, which
    leaves nothing but those caches behind."""
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is not None:
        kernelapp.IPKernelApp().parse_command_line(["-f", "kernel.json"])


def proc_strings(name: str) -> list[str]:
    with open(f"/proc/self/{name}", "rb") as f:
        return [s.decode("utf-8", "surrogateescape") for s in f.read().split(b"\0")[:-1]]


def receive(channel: socket.socket) -> bytes:
    chunks = []
    while chunk := channel.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def main() -> None:
    module, ahead = sys.argv[1], sys.argv[2].split(",")
    # -c put '' first; ipykernel_launcher removes the cwd while it imports
    del sys.path[0]
    before = dict(os.environ)
    for name in ahead:
        try:
            __import__(name)
        except ImportError:
            pass  # not installed here: the kernel won't import it either
    __import__("runpy")
    warm_parser()
    channel = socket.socket(fileno=os.dup(0))
    # the same strings again: whether this kernel lets us change them at all
    able = show_as(proc_strings("cmdline"), proc_strings("environ"))
    channel.sendall(READY if able else CANT_SHOW_AS)
    data = receive(channel)
    channel.close()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    if not data:
        sys.exit(0)
    request = json.loads(data)
    os.chdir(request["cwd"])
    # what the imports did to the environment (debugpy sets a variable) they
    # would have done to the kernel's, which differs only by its session
    changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
    removed = set(before) - set(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(changed)
    for name in removed:
        os.environ.pop(name, None)
    show_as(request["cmdline"], request["environ"])
    sys.orig_argv = list(request["cmdline"])
    sys.path.insert(0, os.getcwd())  # as `python -m` has it
    sys.argv = ["-m", *request["args"]]
    sys.modules["runpy"].run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
