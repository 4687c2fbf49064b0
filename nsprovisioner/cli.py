"""`nsprovisioner` / `jupyter nsprovisioner`: run, install, doctor."""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any

from . import __version__
from .cgroup_layout import sweep_stale_cgroups
from .errors import SandboxError
from .process import SandboxProcess
from .sandbox import NETWORKS, SECCOMP_MODES, USERS, SandboxSpec
from .spawn import spawn

# the options' defaults are SandboxSpec's, never a copy
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SandboxSpec)
                            if f.init and f.default is not MISSING}

# verb -> module with add_arguments(parser) and main(args) -> int
VERB_MODULES: dict[str, tuple[str, str]] = {
    "doctor": ("nsprovisioner.doctor", "check what this host supports and how to fix it"),
    "install": ("nsprovisioner.kernelspec", "wrap an installed kernelspec in a sandbox"),
}


def add_sandbox_arguments(p: argparse.ArgumentParser) -> None:
    """The sandbox options, named as the config keys (see docs/configuration.md)."""
    g = p.add_argument_group("identity")
    g.add_argument("--user", choices=USERS, default=DEFAULTS["user"],
                   help="run as your own uid/gid (self) or as uid 0 inside (root); "
                   f"default: {DEFAULTS['user']}")
    g.add_argument("--uid-map", action="append", metavar="I:O:N",
                   help="map N uids from O outside to I inside (repeatable; several ranges "
                   "need newuidmap and /etc/subuid)")
    g.add_argument("--gid-map", action="append", metavar="I:O:N",
                   help="as --uid-map, for gids (/etc/subgid)")
    g = p.add_argument_group("namespaces")
    g.add_argument("--network", choices=NETWORKS, default=DEFAULTS["network"],
                   help="none: a private network namespace with only loopback; "
                   f"default: {DEFAULTS['network']}")
    g.add_argument("--no-init", dest="init", action="store_false",
                   help="exec the command itself as PID 1 (it must handle signals and reap "
                   "zombies itself)")
    g.add_argument("--hostname", default=DEFAULTS["hostname"],
                   help=f"hostname inside (default: {DEFAULTS['hostname']})")
    g = p.add_argument_group("filesystem and privileges")
    g.add_argument("--readonly-root", dest="readonly_root", action="store_true",
                   default=DEFAULTS["readonly_root"],
                   help="the host's filesystem is read-only inside"
                   + (" (default)" if DEFAULTS["readonly_root"] else ""))
    g.add_argument("--writable-root", dest="readonly_root", action="store_false",
                   help="the host's filesystem stays writable inside")
    g.add_argument("--readwrite", action="append", metavar="PATH", dest="readwrite_paths",
                   help="a writable path (repeatable; default: "
                   f"{' '.join(DEFAULTS['readwrite_paths'])})")
    g.add_argument("--readonly", action="append", metavar="PATH", dest="readonly_paths",
                   help="a read-only path (repeatable)")
    g.add_argument("--hidden", action="append", metavar="PATH", dest="hidden_paths",
                   help="a path covered by an empty, unreadable mount (repeatable)")
    g.add_argument("--no-private-tmp", dest="private_tmp", action="store_false",
                   help="share the host's /tmp and /var/tmp instead of private tmpfs")
    g.add_argument("--no-private-run", dest="private_run", action="store_false",
                   help="share the host's /run (and its Unix sockets)")
    g.add_argument("--tmp-size", default=DEFAULTS["tmp_size"], metavar="SIZE",
                   help=f"size of the private /tmp, /var/tmp, /dev/shm (default "
                   f"{DEFAULTS['tmp_size'].replace('%', '%%')} of RAM)")
    g.add_argument("--no-protect-home", dest="protect_home", action="store_false",
                   help="leave home's dot entries and Jupyter's and Python's dirs writable")
    g.add_argument("--protected", action="append", metavar="PATH", dest="protected_paths",
                   help="a path read-only even below a writable one (repeatable)")
    g.add_argument("--state-dir", default=DEFAULTS["state_dir"], metavar="DIR",
                   help=f"the sandbox's own writable state (default {DEFAULTS['state_dir']})")
    g.add_argument("--seccomp", choices=SECCOMP_MODES, default=DEFAULTS["seccomp"],
                   help="the default seccomp filter, or none")
    g = p.add_argument_group("resource limits")
    g.add_argument("--memory-limit", metavar="SIZE", help="memory (and swap) limit, e.g. 512M")
    g.add_argument("--cpu-limit", type=float, metavar="CORES", help="CPU limit in cores, e.g. 0.5")
    g.add_argument("--pids-limit", type=int, metavar="N", help="most processes at once")
    g.add_argument("--nproc-limit", type=int, default=DEFAULTS["nproc_limit"], metavar="N",
                   help=f"RLIMIT_NPROC inside (default {DEFAULTS['nproc_limit']})")
    g.add_argument("--cgroup-parent", default=DEFAULTS["cgroup_parent"], metavar="PATH",
                   help="where the sandbox's cgroup is created "
                   f"(default: {DEFAULTS['cgroup_parent']})")
    g.add_argument("--no-strict", dest="strict", action="store_false",
                   help="warn instead of failing when the host can't enforce a setting")


def spec_from_args(args: argparse.Namespace) -> SandboxSpec:
    return SandboxSpec(
        user=args.user, uid_map=args.uid_map, gid_map=args.gid_map, init=args.init,
        network=args.network, hostname=args.hostname, readonly_root=args.readonly_root,
        readwrite_paths=(args.readwrite_paths if args.readwrite_paths is not None
                         else DEFAULTS["readwrite_paths"]),
        readonly_paths=args.readonly_paths or DEFAULTS["readonly_paths"],
        hidden_paths=args.hidden_paths or DEFAULTS["hidden_paths"],
        private_tmp=args.private_tmp, private_run=args.private_run, tmp_size=args.tmp_size,
        protect_home=args.protect_home,
        protected_paths=args.protected_paths or DEFAULTS["protected_paths"],
        state_dir=args.state_dir, nproc_limit=args.nproc_limit,
        seccomp=args.seccomp, memory_limit=args.memory_limit,
        cpu_limit=args.cpu_limit, pids_limit=args.pids_limit,
        cgroup_parent=args.cgroup_parent, strict=args.strict,
    )


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


async def run_command(spec: SandboxSpec, command: list[str], cwd: str | None,
                      env: Mapping[str, str] | None = None) -> int:
    """Run the command with our stdio; forward the usual signals; its exit status.

    The handlers go in before the sandbox starts: a signal that arrives while
    it starts is delivered to it once it runs, instead of ending us midway.
    """
    try:  # what an earlier run left when it was SIGKILLed
        sweep_stale_cgroups(spec.cgroup_parent)
    except OSError as e:
        print(f"nsprovisioner: could not sweep stale sandbox cgroups: {e}", file=sys.stderr)
    loop = asyncio.get_running_loop()
    proc: SandboxProcess | None = None
    pending: list[int] = []

    def forward(sig: int) -> None:
        if proc is None:
            pending.append(sig)
        else:
            proc.send_signal(sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    try:
        proc = await spawn(spec, command, cwd=cwd, env=env)
        for early in pending:
            proc.send_signal(early)
        code = await proc.wait()
    finally:
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
    return code if code >= 0 else 128 - code


def failure_status(e: SandboxError) -> int:
    """The exit status for a sandbox that did not start, as a shell reports a command's."""
    if e.step in ("exec", "init_exec"):
        return 127 if e.errno == errno.ENOENT else 126
    return 125


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsprovisioner",
        description="Run commands and Jupyter kernels in fresh Linux namespaces.")
    parser.add_argument("--version", action="version", version=f"nsprovisioner {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    run = verbs.add_parser(
        "run", help="run a command in a sandbox",
        description="Run CMD in a new sandbox with this terminal's stdin, stdout and stderr; "
        "exit with CMD's status (128+N if it died of signal N).")
    add_sandbox_arguments(run)
    run.add_argument("--cwd", metavar="DIR", help="working directory inside (default: current)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    for verb, (module_name, help_text) in VERB_MODULES.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(verb, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        if args.verb == "run":
            command = list(args.command)
            if command[:1] == ["--"]:
                command = command[1:]
            if not command:
                parser.error("run: give the command after --, e.g. nsprovisioner run -- bash")
            return asyncio.run(run_command(spec_from_args(args), command, args.cwd))
        module = importlib.import_module(VERB_MODULES[args.verb][0])
        result: int = module.main(args)
        return result
    except SandboxError as e:
        print(f"nsprovisioner: {e}", file=sys.stderr)
        if args.verb != "run":
            return 1
        return failure_status(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
