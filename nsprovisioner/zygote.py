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
as -m sets them, its stdin /dev/null as a kernel's is. An empty request (the pool shutting it
down) ends it.

Nothing here may run code of a notebook's, nor import from the cwd:
ipykernel_launcher takes the cwd off sys.path while it imports, and so does
this program.
"""

import json
import os
import socket
import sys

READY = b"ready"


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
    channel = socket.socket(fileno=os.dup(0))
    channel.sendall(READY)
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
    sys.path.insert(0, os.getcwd())  # as `python -m` has it
    sys.argv = ["-m", *request["args"]]
    sys.modules["runpy"].run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
