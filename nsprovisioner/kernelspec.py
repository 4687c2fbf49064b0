"""Wrap an installed kernelspec so that its kernels start in a sandbox.

The new kernelspec is a copy of the source (env, language, interrupt_mode,
metadata and resource files such as logos) with metadata.kernel_provisioner
naming namespace-provisioner and the options given with --config, and the
source's argv behind the sandboxing launcher (nsprovisioner.kernel_launcher),
so that a client that ignores provisioners still starts it in its sandbox.
Example:

    jupyter nsprovisioner install --from python3 --name python3-sandboxed \\
        --config memory_limit=2G --config network=none --user
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .errors import SandboxError
from .kernel_launcher import PROVISIONER_NAME, wrap_argv
from .kernelsandbox import CONFIG_KEYS, check_env_keep, check_keys, merge_spec
from .pool import check_pool_size
from .provisioner import NamespaceProvisioner

# jupyter_client finds kernels by directory name, case-insensitively
NAME_PATTERN = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--from", dest="source", required=True, metavar="KERNEL",
                        help="the installed kernelspec to wrap (see `jupyter kernelspec list`)")
    parser.add_argument("--name", required=True,
                        help="the new kernelspec's name: letters, digits, '.', '_', '-'")
    parser.add_argument("--display-name", metavar="TEXT",
                        help="the name shown in JupyterLab (default: the source's, "
                        "with ' (sandboxed)')")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="a sandbox option, as in c.NamespaceProvisioner (repeatable); "
                        "VALUE is JSON where it parses as JSON, else a string, e.g. "
                        f"memory_limit=2G, pids_limit=256, readonly_paths='[\"/data\"]'. "
                        f"Options: {', '.join(CONFIG_KEYS)}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true",
                       help="install for the current user (the default)")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", metavar="DIR",
                       help="install into DIR/share/jupyter/kernels")


def parse_options(items: list[str]) -> dict[str, Any]:
    """{key: value} from KEY=VALUE strings, checked as the provisioner will check them."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SandboxError(f"--config {item!r} must be KEY=VALUE, e.g. memory_limit=2G")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    where = "--config"
    check_keys(options, where)
    if "env_keep" in options:
        check_env_keep(options["env_keep"], where)
    if "pool_size" in options:
        check_pool_size(options["pool_size"], where)
    defaults = NamespaceProvisioner()
    configured = {key: getattr(defaults, key) for key in CONFIG_KEYS}
    merge_spec(configured, options, "Jupyter config", where)
    return options


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise SandboxError(f"kernel name {name!r} may contain only letters, digits, '.', '_' "
                           "and '-', e.g. python3-sandboxed")
    return name.lower()


def wrapped_kernel_json(source: dict[str, Any], name: str, display_name: str,
                        options: dict[str, Any]) -> dict[str, Any]:
    """The source's kernel.json with the provisioner stanza replaced by ours and its
    argv behind the launcher (this Python runs it: it has nsprovisioner)."""
    spec = dict(source)
    spec["argv"] = wrap_argv(source.get("argv") or [], name, sys.executable)
    spec["display_name"] = display_name
    metadata = dict(spec.get("metadata") or {})
    metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME, "config": options}
    spec["metadata"] = metadata
    return spec


def install(source_name: str, name: str, display_name: str | None, options: dict[str, Any],
            *, user: bool, prefix: str | None) -> str:
    """Install the wrapped kernelspec; the directory it went to."""
    ksm = KernelSpecManager()
    try:
        source_dir = ksm.find_kernel_specs()[source_name.lower()]
    except KeyError:
        found = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
        raise SandboxError(f"no kernelspec named {source_name!r} is installed (found: {found}); "
                           "`jupyter kernelspec list` shows them") from None
    try:
        ksm.get_kernel_spec(source_name)
        with open(os.path.join(source_dir, "kernel.json")) as f:
            source = json.load(f)
    except (OSError, ValueError, NoSuchKernel) as e:
        raise SandboxError(f"kernelspec {source_name!r} in {source_dir} can't be read: {e}") \
            from None
    old = (source.get("metadata") or {}).get("kernel_provisioner", {})
    if old.get("provisioner_name") not in (None, PROVISIONER_NAME):
        print(f"nsprovisioner: {source_name!r} used provisioner "
              f"{old['provisioner_name']!r}; {name!r} uses {PROVISIONER_NAME!r} instead",
              file=sys.stderr)
    title = display_name or f"{source.get('display_name', source_name)} (sandboxed)"
    with tempfile.TemporaryDirectory() as staging:
        target = os.path.join(staging, name)
        shutil.copytree(source_dir, target)
        with open(os.path.join(target, "kernel.json"), "w") as f:
            json.dump(wrapped_kernel_json(source, name, title, options), f, indent=2)
            f.write("\n")
        try:
            return str(ksm.install_kernel_spec(target, name, user=user, prefix=prefix))
        except PermissionError as e:
            raise SandboxError(f"can't install kernelspec {name!r}: {e}",
                               hint="use --user, or --sys-prefix in a virtualenv") from None


def main(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    if name == args.source.lower():
        raise SandboxError(f"--name {args.name!r} is the source kernel's own name; "
                           "give the wrapped kernel a new one, e.g. "
                           f"{args.source.lower()}-sandboxed")
    options = parse_options(args.config)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    user = prefix is None
    where = install(args.source, name, args.display_name, options, user=user, prefix=prefix)
    print(f"Installed kernelspec {name} in {where}")
    return 0
