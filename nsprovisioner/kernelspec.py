"""Wrap an installed kernelspec so that its kernels start in a sandbox.

The new kernelspec is a copy of the source (env, language, interrupt_mode,
metadata and resource files such as logos) with metadata.kernel_provisioner
naming namespace-provisioner and the options given with --config, and the
source's argv behind the sandboxing launcher (nsprovisioner.kernel_launcher),
so that a client that ignores provisioners still starts it in its sandbox.
Before it installs, it checks what the options ask against this host (the
checks of `jupyter nsprovisioner doctor`): each problem is a warning with its
fix, or with --strict a refusal. Example:

    jupyter nsprovisioner install --from python3 --name python3-sandboxed \\
        --config memory_limit=2G --config network=none --user --strict
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from .doctor import gather_facts
from .errors import SandboxError
from .install_check import problems_for
from .kernel_launcher import PROVISIONER_NAME, wrap_argv
from .kernelsandbox import CONFIG_KEYS, check_env_keep, check_keys, merge_spec
from .pool import check_pool_size
from .provisioner import NamespaceProvisioner
from .sandbox import SandboxSpec

# jupyter_client finds kernels by directory name, case-insensitively
NAME_PATTERN = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
# The shipped kernelspec (share/jupyter/kernels/) holds the sandbox's logos:
# installed with the package, or beside it in a checkout.
SHIPPED_KERNEL = "python3-sandboxed"
CHECKOUT_KERNEL = Path(__file__).resolve().parent.parent / "share/jupyter/kernels" / SHIPPED_KERNEL
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
# the options a display name summarizes, with their short names
TITLE_OPTIONS = {"memory_limit": "memory", "cpu_limit": "cpu", "pids_limit": "pids",
                 "network": "network", "gpus": "gpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--from", dest="source", required=True, metavar="KERNEL",
                        help="the installed kernelspec to wrap (see `jupyter kernelspec list`)")
    parser.add_argument("--name", required=True,
                        help="the new kernelspec's name: letters, digits, '.', '_', '-'")
    parser.add_argument("--display-name", metavar="TEXT",
                        help="the name shown in JupyterLab (default: the source's, with "
                        "'sandboxed' and the options that set it apart, e.g. 'Python 3 "
                        "(ipykernel), sandboxed: memory 2G, network none')")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="a sandbox option, as in c.NamespaceProvisioner (repeatable); "
                        "VALUE is JSON where it parses as JSON, else a string, e.g. "
                        f"memory_limit=2G, pids_limit=256, readonly_paths='[\"/data\"]'. "
                        f"Options: {', '.join(CONFIG_KEYS)}")
    parser.add_argument("--strict", action="store_true",
                        help="refuse to install when this host can't give the kernel what "
                        "--config asks (the checks of `jupyter nsprovisioner doctor`); without "
                        "it, each such problem is a warning with its fix")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true",
                       help="install for the current user (the default)")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", metavar="DIR",
                       help="install into DIR/share/jupyter/kernels")


def parse_options(items: list[str]) -> tuple[dict[str, Any], SandboxSpec]:
    """{key: value} from KEY=VALUE strings, checked as the provisioner will check them, and
    the sandbox they make over the provisioner's defaults."""
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
    return options, merge_spec(configured, options, "Jupyter config", where)


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


def default_title(source_title: str, name: str, options: dict[str, Any],
                  ksm: KernelSpecManager) -> str:
    """'<source>, sandboxed' and the options that set it apart; with the kernel's name
    too when another kernelspec already shows that title, or nothing sets it apart."""
    shown = [f"{short} {options[key]}" for key, short in TITLE_OPTIONS.items() if key in options]
    more = len([key for key in options if key not in TITLE_OPTIONS])
    if more:
        shown.append(f"+{more} option{'s' if more > 1 else ''}")
    title = f"{source_title}, sandboxed" + (f": {', '.join(shown)}" if shown else "")
    others = {spec["spec"].get("display_name") for other, spec in
              ksm.get_all_specs().items() if other != name}
    if not shown or title in others:
        title += f" [{name}]"
    return title


def add_logos(target: str, ksm: KernelSpecManager) -> None:
    """The sandbox's logos in `target` when the source brought none of its own."""
    if any(os.path.exists(os.path.join(target, logo)) for logo in LOGOS):
        return
    places = [CHECKOUT_KERNEL]
    try:
        places.insert(0, Path(ksm.get_kernel_spec(SHIPPED_KERNEL).resource_dir))
    except NoSuchKernel:
        pass
    for place in places:
        if all((place / logo).is_file() for logo in LOGOS):
            for logo in LOGOS:
                shutil.copyfile(place / logo, os.path.join(target, logo))
            return


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
    title = display_name or default_title(source.get("display_name", source_name), name,
                                          options, ksm)
    with tempfile.TemporaryDirectory() as staging:
        target = os.path.join(staging, name)
        shutil.copytree(source_dir, target)
        add_logos(target, ksm)
        with open(os.path.join(target, "kernel.json"), "w") as f:
            json.dump(wrapped_kernel_json(source, name, title, options), f, indent=2)
            f.write("\n")
        try:
            return str(ksm.install_kernel_spec(target, name, user=user, prefix=prefix))
        except PermissionError as e:
            raise SandboxError(f"can't install kernelspec {name!r}: {e}",
                               hint="use --user, or --sys-prefix in a virtualenv") from None


def check_host(name: str, spec: SandboxSpec, options: dict[str, Any], *, strict: bool) -> None:
    """Warn about (or, strict, refuse) options this host can't satisfy, each with its fix."""
    problems = problems_for(spec, options, gather_facts())
    for problem in problems:
        print(f"nsprovisioner: {'error' if strict else 'warning'}: {problem.describe()}",
              file=sys.stderr)
    if problems and strict:
        raise SandboxError(f"kernelspec {name!r} not installed: this host can't start its "
                           "kernels as configured (above, each with its fix)",
                           hint="fix the host, change --config, or install without --strict")


def main(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    if name == args.source.lower():
        raise SandboxError(f"--name {args.name!r} is the source kernel's own name; "
                           "give the wrapped kernel a new one, e.g. "
                           f"{args.source.lower()}-sandboxed")
    options, spec = parse_options(args.config)
    check_host(name, spec, options, strict=args.strict)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    user = prefix is None
    where = install(args.source, name, args.display_name, options, user=user, prefix=prefix)
    print(f"Installed kernelspec {name} in {where}")
    return 0
