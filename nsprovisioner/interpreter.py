"""The command's interpreter, reachable inside whatever the sandbox replaces.

A kernel's argv[0] is an interpreter (a venv's python) or a script whose
`#!` line names one, and either may be a symlink into another installation
(a venv's python links to its base, which uv and CI tools also put under
/tmp). The sandbox replaces /tmp and /var/tmp (private_tmp) and /run
(private_run) with empty filesystems of its own and covers hidden_paths:
an installation there would vanish, and the exec would fail with a bare
ENOENT. Each such installation (its prefix, `<p>` of `<p>/bin/x`) is bound
back read-only, and protected like the interpreter's own prefix elsewhere
(protect.py), so the kernel can't change what the next kernel runs. Where
that can't be done, the start fails here, before the clone, naming the path
and the fix.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import SandboxError
from .protect import interpreter_prefix

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

SHEBANG_MAX = 256


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def interpreter_files(argv0: str) -> list[str]:
    """argv0, the interpreter its `#!` line names, and where each symlink leads."""
    found: list[str] = []
    for path in (argv0, _shebang(argv0)):
        if path and os.path.isabs(path):
            for p in (path, os.path.realpath(path)):
                if p not in found:
                    found.append(p)
    return found


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(SHEBANG_MAX)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def replaced_trees(spec: SandboxSpec) -> list[str]:
    """What the sandbox mounts a filesystem of its own on (empty of the host's files)."""
    trees = ["/dev", "/proc"]
    if spec.private_tmp:
        trees += ["/tmp", "/var/tmp"]
    if spec.private_run:
        trees += ["/run"]
    return trees


def bind_interpreter(spec: SandboxSpec, argv0: str | None, paths: dict[str, str]) -> None:
    """Add to `paths` (real path -> kind, as mounts.py plans them) the prefix of every
    interpreter file that would be covered; SandboxError where none can be bound."""
    if argv0 is None:
        return
    for path in interpreter_files(argv0):
        cover = _covering(spec, path, paths)
        if cover is None:
            continue
        prefix = interpreter_prefix(path)
        real_prefix = os.path.realpath(prefix) if prefix else None
        if cover in paths:  # a hidden path of the configuration
            raise SandboxError(
                f"the command's interpreter {path} lies in {cover}, which hidden_paths hides",
                hint=f"add {real_prefix or path} to readonly_paths (a deeper path stays "
                f"visible), or remove {cover} from hidden_paths")
        fixable = (real_prefix is not None and cover in ("/tmp", "/var/tmp", "/run")
                   and real_prefix != cover and _within(real_prefix, cover))
        if not fixable or real_prefix is None:
            raise SandboxError(
                f"the command's interpreter {path} lies in {cover}, which the sandbox replaces "
                "with its own (empty) filesystem, and its installation can't be bound back "
                "on its own",
                hint=f"install it outside {cover} (e.g. a venv below your home), or put it "
                f"in a directory of its own below {cover} (<dir>/bin/{os.path.basename(path)})"
                + (f", or set {_option(cover)} = false" if _option(cover) else ""))
        if paths.get(real_prefix) not in ("protected", "hidden"):
            paths[real_prefix] = "protected"


def _option(tree: str) -> str | None:
    return {"/tmp": "private_tmp", "/var/tmp": "private_tmp", "/run": "private_run"}.get(tree)


def _covering(spec: SandboxSpec, path: str, paths: dict[str, str]) -> str | None:
    """The replaced tree or hidden path that covers `path` inside, or None when it shows."""
    enclosing = [top for top in paths if _within(path, top)]
    nearest = max(enclosing, key=len) if enclosing else None
    if nearest is not None and paths[nearest] != "hidden":
        return None  # bound from the host (a deeper path wins over a hidden one)
    if nearest is not None:
        return nearest
    return next((t for t in replaced_trees(spec) if _within(path, t)), None)
