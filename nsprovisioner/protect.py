"""What a kernel may not change for anything that runs outside its sandbox.

A notebook is hostile. Home and the notebook's directory are writable inside,
and a great deal that runs later *outside* the sandbox reads its code or its
configuration from there: the Jupyter server (its config, its kernelspecs,
the `.pth` files and modules of its Python), every kernel started later, the
user's shell and tools. This module lists those paths, so that mounts.py binds
them read-only even below a writable path.

The rule covers a class, not a list: every top-level dot entry of home
(shell rc files, ~/.ssh, ~/.config, ~/.local with the user site and Jupyter's
data dir, ~/.jupyter, ~/.gitconfig, tool configs, caches), ~/bin, and every
directory the calling Python process (the Jupyter server) resolves for Jupyter
(jupyter_core's config and data paths, with their environment overrides) and
for itself (prefixes, site dirs, user site, every directory on sys.path),
plus the kernel interpreter's own prefix. What the sandbox needs to write
instead lives in its state directory (sandbox_state_env()).

A Jupyter or Python directory that does not exist yet but could be created
inside (e.g. ~/.jupyter on a fresh account) is created empty first, so that it
exists to be bound read-only: a kernel can't plant what the server would read
at its next start.
"""

from __future__ import annotations

import logging
import os
import site
import stat
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from jupyter_core import paths as jupyter_paths

from .errors import SandboxError

if TYPE_CHECKING:
    from .sandbox import SandboxSpec

# Non-dot entries of home that something outside runs from: Debian's
# ~/.profile puts ~/bin on PATH when it exists.
HOME_EXECUTABLE_DIRS = ("bin",)

log = logging.getLogger(__name__)
# Directories of home that tools outside read, made empty when missing (an
# empty one changes nothing for them) so that they exist to be protected: a
# kernel can't plant ~/.ssh/authorized_keys, a pip.conf or a cache entry in a
# home that had none. (A missing dot *file* can't be made so without changing
# what a shell reads: docs/security.md.)
HOME_DIRS_MADE = (".ssh", ".config", ".cache", ".local", ".ipython", ".jupyter", "bin")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def home_dir() -> str:
    return os.path.realpath(os.path.expanduser("~"))


def server_dirs() -> list[str]:
    """Directories Jupyter and this Python read config and code from at start, present or
    not: jupyter_core's config and data paths (with their environment overrides) and
    the user site."""
    found: list[str] = [jupyter_paths.jupyter_config_dir(), jupyter_paths.jupyter_data_dir()]
    found += jupyter_paths.jupyter_config_path()
    found += jupyter_paths.jupyter_path()
    found += [site.getusersitepackages()]
    ipython_dir = os.environ.get("IPYTHONDIR")
    if ipython_dir:
        found.append(ipython_dir)
    return found


def server_code_paths() -> list[str]:
    """Where this process (the Jupyter server) imports code from, where it exists."""
    found = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    found += site.getsitepackages()
    found += [site.getuserbase()]
    found += [entry for entry in sys.path if os.path.isabs(entry)]
    return found


def interpreter_prefix(argv0: str) -> str | None:
    """The installation a kernel's interpreter comes from: a venv or prefix is `<p>/bin/x`.

    Symlinks are not followed for the prefix: a venv's python links to the
    base interpreter, but the venv is what kernels of other kernelspecs and
    the server may share.
    """
    if not os.path.isabs(argv0):
        return None
    directory = os.path.dirname(os.path.abspath(argv0))
    if os.path.basename(directory) == "bin":
        return os.path.dirname(directory)
    return directory


def writable_inside(path: str, spec: SandboxSpec, writable_roots: Iterable[str]) -> bool:
    if not spec.readonly_root:
        return True
    return any(_within(path, root) for root in writable_roots)


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def protected_paths(spec: SandboxSpec, writable_roots: list[str],
                    argv0: str | None = None) -> list[str]:
    """Real paths to bind read-only inside, each writable there otherwise.

    `writable_roots` are the resolved readwrite paths. A Jupyter or Python
    directory that is absent, and that the sandbox could create because no
    protected path holds it, is created here (empty, 0700).
    """
    home = home_dir()
    # A path that holds a writable root (home itself on sys.path, the
    # notebook's directory) would take the user's data with it.
    ours = {home, *writable_roots}
    found: set[str] = set()

    def protect(path: str) -> None:
        real = os.path.realpath(path)
        if ((os.path.isdir(real) or os.path.isfile(real))
                and not any(_within(root, real) for root in ours)
                and writable_inside(real, spec, writable_roots)):
            found.add(real)

    creatable = [os.path.expanduser(p) for p in spec.protected_paths]
    if spec.protect_home:
        creatable += [os.path.join(home, name) for name in HOME_DIRS_MADE
                      if name not in spec.writable_dotfiles]
        creatable += server_dirs()
        existing = server_code_paths()
        prefix = interpreter_prefix(argv0) if argv0 else None
        for path in existing + ([prefix] if prefix else []):
            if os.path.lexists(path):
                protect(path)
        if writable_inside(home, spec, writable_roots):
            try:
                entries = list(os.scandir(home))
            except OSError:
                entries = []
            for entry in entries:
                if ((entry.name.startswith(".") or entry.name in HOME_EXECUTABLE_DIRS)
                        and entry.name not in spec.writable_dotfiles):
                    protect(entry.path)
    for raw in creatable:
        path = os.path.abspath(raw)
        if not os.path.lexists(path):
            anchor = os.path.realpath(_nearest_existing(path))
            if (any(_within(anchor, top) for top in found)
                    or not writable_inside(anchor, spec, writable_roots)):
                continue  # protected by what holds it, or the sandbox can't make it
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError:
                continue
        protect(path)
    return sorted(found)


def state_paths(spec: SandboxSpec, name: str) -> dict[str, str]:
    """The sandbox's own writable state, made if missing: what each part is for -> path.

    Shared by the sandboxes of one kernelspec (`name`) and read by nothing
    outside them.
    """
    if spec.state_dir is None:
        return {}
    root = os.path.expanduser(spec.state_dir)
    os.makedirs(root, mode=0o700, exist_ok=True)
    below = {"cache": ("cache",), "ipython": ("ipython",), "matplotlib": ("matplotlib",),
             "python": ("python", name if name not in ("", ".", "..") else "_")}
    parts = {"state": root}
    for part, names in below.items():
        _make_below(root, names)
        parts[part] = os.path.join(root, *names)
    return parts


def _make_below(root: str, names: tuple[str, ...]) -> None:
    """Make root/names..., never following a symlink below `root`.

    Every sandbox writes in its state directory: a kernel can swap one of
    these directories for a symlink to where it can't write (~/.jupyter), and
    the server's next makedirs would create a directory there. A symlink found
    is removed (it holds nothing) and a directory made in its place; anything
    else that is not a directory is an error naming it.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = root
    try:
        for component in names:
            component = component.replace("/", "_")
            path = os.path.join(path, component)
            try:
                os.mkdir(component, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                child = _replace_symlink(fd, component, path)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def _replace_symlink(dir_fd: int, component: str, path: str) -> int:
    if not stat.S_ISLNK(os.lstat(component, dir_fd=dir_fd).st_mode):
        raise SandboxError(f"{path} in the sandboxes' state directory is not a directory",
                           hint=f"remove it (rm {path}) or set state_dir elsewhere")
    log.warning("%s: a sandbox had replaced this state directory by a symlink; it is a "
                "directory again", path)
    os.unlink(component, dir_fd=dir_fd)
    os.mkdir(component, 0o700, dir_fd=dir_fd)
    return os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dir_fd)


# The directory whose sitecustomize makes the sandbox's Python user base
# visible (also in a venv, where Python hides user sites).
SANDBOX_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_site")


def sandbox_state_env(parts: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """Variables that point a sandboxed program's writable state at `parts`.

    Caches, IPython's directory (history, profiles) and pip's installs then
    land in the sandbox's state instead of home's read-only dot entries;
    `%pip install X` and `%pip install --user X` install into a user base that
    only sandboxes put on sys.path.
    """
    if not parts:
        return {}
    python_path = env.get("PYTHONPATH")
    return {
        "XDG_CACHE_HOME": parts["cache"],
        "IPYTHONDIR": parts["ipython"],
        "MPLCONFIGDIR": parts["matplotlib"],
        "PYTHONUSERBASE": parts["python"],
        "PYTHONPATH": SANDBOX_SITE + (os.pathsep + python_path if python_path else ""),
    }
