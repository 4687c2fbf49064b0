"""The kernelspec argv that starts the kernel in a sandbox whoever runs it.

A kernelspec selects namespace-provisioner in `metadata.kernel_provisioner`,
which only jupyter_client 7+ reads. Clients that run a kernelspec's argv
themselves (VS Code's direct launch, nteract, editors, old servers) would
start an ordinary kernel under a name that says "(sandboxed)". So the argv
this package writes runs this module first:

    python -m nsprovisioner.kernel_launcher --resource-dir {resource_dir} \\
        --kernel-name NAME -- python -m ipykernel_launcher -f {connection_file}

Run directly, it reads the kernelspec's own kernel.json, starts the argv after
`--` with spawn() as namespace-provisioner would (its config over the
provisioner's defaults, the same env allow-list, Jupyter's runtime dirs
hidden) and then stands in for the kernel: it forwards the signals a client
sends, relays stdio (the kernel writes to the same fds) and exits with the
kernel's status. Anything it can't honour fails the start; it never runs the
kernel outside a sandbox.

Launched by namespace-provisioner, the prefix costs nothing: kernel_argv()
recognises it and the provisioner starts the argv after `--` itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_core.paths import jupyter_runtime_dir

from .cli import failure_status, run_command
from .errors import SandboxError
from .kernelsandbox import hide_runtime_dirs, sandboxed_kernel_env
from .sandbox import SandboxSpec

MODULE = "nsprovisioner.kernel_launcher"
PROVISIONER_NAME = "namespace-provisioner"
# jupyter_client substitutes it; a client that doesn't leaves it as it is
RESOURCE_DIR = "{resource_dir}"
# jupyter_client's rule for argv[0] (KernelManager.format_kernel_cmd): these
# names mean "this Python", which for the kernel after `--` is the Python
# that runs the launcher
BARE_PYTHON = re.compile(r"^python(\d(\.\d+)?)?$")


def wrap_argv(argv: Sequence[str], kernel_name: str, python: str = "python") -> list[str]:
    """The launcher argv for a kernel's argv; an argv already wrapped is re-wrapped, not nested."""
    inner = kernel_argv(argv)
    return [python, "-m", MODULE, "--resource-dir", RESOURCE_DIR, "--kernel-name", kernel_name,
            "--", *inner]


def _parse_prefix(argv: Sequence[str]) -> tuple[dict[str, str], int] | None:
    """Our options and the index of `--` when `argv` starts with exactly our prefix."""
    if len(argv) < 4 or list(argv[1:3]) != ["-m", MODULE]:
        return None
    options: dict[str, str] = {}
    i = 3
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return options, i
        if arg not in ("--resource-dir", "--kernel-name") or i + 1 >= len(argv) \
                or arg in options:
            return None
        options[arg] = argv[i + 1]
        i += 2
    return None


def kernel_argv(argv: Sequence[str]) -> list[str]:
    """The kernel's own argv: `argv` less our launcher prefix, or `argv` when it has none.

    A bare `python` after the prefix becomes the prefix's interpreter, the
    one jupyter_client (or the client) chose, as it would have been for an
    unwrapped kernelspec.
    """
    parsed = _parse_prefix(argv)
    if parsed is None:
        return list(argv)
    inner = list(argv[parsed[1] + 1:])
    if inner and BARE_PYTHON.match(inner[0]) and not BARE_PYTHON.match(argv[0]):
        inner[0] = argv[0]
    return inner


def find_kernel_json(resource_dir: str | None, kernel_name: str | None) -> str:
    """The kernelspec's kernel.json: in {resource_dir} when the client substituted it,
    else found by name on Jupyter's kernel path."""
    if resource_dir and resource_dir != RESOURCE_DIR:
        path = os.path.join(resource_dir, "kernel.json")
        if not os.path.isfile(path):
            raise SandboxError(f"no kernel.json in the kernelspec directory {resource_dir}")
        return path
    if not kernel_name:
        raise SandboxError("the client did not substitute {resource_dir} and no --kernel-name "
                           "was given: can't find the kernelspec's sandbox options")
    found = KernelSpecManager().find_kernel_specs().get(kernel_name.lower())
    if found is None:
        raise SandboxError(f"no kernelspec named {kernel_name!r} on Jupyter's kernel path, "
                           "where its sandbox options are",
                           hint="`jupyter kernelspec list` shows the path; set JUPYTER_PATH "
                           "to the directory above kernels/ if it is elsewhere")
    return os.path.join(found, "kernel.json")


def read_kernelspec(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """kernel.json, and its provisioner options (none when it names no provisioner)."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise SandboxError(f"can't read kernelspec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise SandboxError(f"kernelspec {path} is not a JSON object")
    stanza = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    name = stanza.get("provisioner_name", PROVISIONER_NAME)
    if name != PROVISIONER_NAME:
        raise SandboxError(f"kernelspec {path} names provisioner {name!r}, whose options the "
                           f"launcher can't apply; only {PROVISIONER_NAME!r} kernelspecs run "
                           f"through {MODULE}")
    return spec, dict(stanza.get("config") or {})


def resolve(kernelspec_path: str) -> tuple[SandboxSpec, tuple[str, ...], dict[str, Any]]:
    """The sandbox and env allow-list namespace-provisioner would use for this kernelspec
    (its config over the provisioner's defaults), and the kernel.json."""
    # Imported here: provisioner.py imports kernel_argv() from this module.
    from .provisioner import NamespaceProvisioner

    spec, options = read_kernelspec(kernelspec_path)
    resource_dir = os.path.dirname(kernelspec_path)
    provisioner = NamespaceProvisioner(
        kernel_spec=KernelSpec.from_resource_dir(resource_dir), **options)
    sandbox, keep = provisioner.resolve_options()
    return sandbox, keep, spec


def connection_files(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The connection files named in the kernel's argv (`-f F`, `--f=F`,
    `--connection-file=F`...), by real path: JSON files with a key and ports.
    Other files in the argv are no business of the sandbox's."""
    found = {}
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        value = value.strip('"')  # VS Code quotes paths with spaces
        if not value.endswith(".json") or not os.path.isfile(value):
            continue
        try:
            with open(value) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "key" in info and "shell_port" in info:
            found[os.path.realpath(value)] = info
    return found


def transport(argv: Sequence[str], files: dict[str, dict[str, Any]]) -> tuple[str, str | None]:
    """The zmq transport the client chose and, for ipc, the socket path prefix."""
    if files:
        info = next(iter(files.values()))
        return str(info.get("transport", "tcp")), info.get("ip")
    # VS Code passes a Python kernel's connection on the command line instead
    for arg in argv:
        if arg.startswith("--transport="):
            return arg.partition("=")[2].strip('"'), None
    return "tcp", None


def fit_to_client(spec: SandboxSpec, argv: Sequence[str], kernel_name: str) -> SandboxSpec:
    """`spec` with the client's connection file visible (read-only) and Jupyter's runtime
    dirs hidden, as the provisioner does; SandboxError when the client's transport can't
    reach a kernel in this sandbox."""
    files = connection_files(argv)
    runtime_dirs = {jupyter_runtime_dir(), *(os.path.dirname(f) for f in files)}
    spec = hide_runtime_dirs(spec, sorted(runtime_dirs), *files)
    if spec.network == "host":
        return spec
    kind, ip = transport(argv, files)
    if kind != "ipc":
        raise SandboxError(
            f"kernelspec {kernel_name!r} has network {spec.network!r}: the kernel gets a "
            f"network of its own with only loopback, which this client's {kind} connection "
            "can't reach",
            hint="start it from a client that honours kernel provisioners (JupyterLab, "
            "Notebook 7, nbclient, jupyter console: jupyter_client >= 7), or from one that "
            "supports the ipc transport; or use a kernelspec with network = 'host'")
    socket_dir = os.path.dirname(os.path.realpath(ip or "kernel-ipc"))
    if socket_dir in spec.hidden_paths:
        raise SandboxError(
            f"the client's ipc sockets ({ip}-N) are in {socket_dir}, which holds other "
            "kernels' connection files and stays hidden from the kernel",
            hint="give the sockets a directory of their own (the connection file's ip)")
    return dataclasses.replace(spec, readwrite_paths=(*spec.readwrite_paths, socket_dir))


async def launch(resource_dir: str | None, kernel_name: str | None,
                 argv: Sequence[str]) -> int:
    """Start `argv` in the kernelspec's sandbox and stand in for it; its exit status."""
    path = find_kernel_json(resource_dir, kernel_name)
    sandbox, keep, kernelspec = resolve(path)
    name = kernel_name or os.path.basename(os.path.dirname(path))
    sandbox = fit_to_client(sandbox, argv, name)
    env = sandboxed_kernel_env(os.environ, keep, kernelspec.get("env") or {}, sandbox, name)
    return await run_command(sandbox, list(argv), None, env=env)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Start a kernel in the sandbox its kernelspec configures, for clients "
        "that run kernelspec argvs themselves.")
    parser.add_argument("--resource-dir", metavar="DIR",
                        help="the kernelspec's directory ({resource_dir} in kernel.json)")
    parser.add_argument("--kernel-name", metavar="NAME",
                        help="the kernelspec's name, to find it when the client did not "
                        "substitute {resource_dir}")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- KERNEL ARGV")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the kernel's argv after --")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Relaunched argv[0] is this interpreter: a bare `python` kernel runs on it.
    command = kernel_argv([sys.executable, "-m", MODULE, "--", *args.command])
    try:
        return asyncio.run(launch(args.resource_dir, args.kernel_name, command))
    except SandboxError as e:
        print(f"{MODULE}: the kernel was not started: {e}", file=sys.stderr)
        return failure_status(e)


if __name__ == "__main__":
    sys.exit(main())
