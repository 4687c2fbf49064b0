"""What the Jupyter side decides about one kernel's sandbox.

The provisioner's options come from two places, Jupyter config files
(`c.NamespaceProvisioner.<name>`) and the kernelspec
(`metadata.kernel_provisioner.config`); this module merges them into one
SandboxSpec, the kernelspec winning, and names the source of a bad value.
It also decides which of the server's environment variables a kernel gets
and which host paths it can see: the two ways a kernel could otherwise learn
the server's secrets.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace
from fnmatch import fnmatchcase
from typing import Any

from .devices import gpu_env
from .errors import SandboxError
from .protect import sandbox_state_env, state_paths
from .sandbox import SandboxSpec

# Every option but env_keep and pool_size (pool.py) is a SandboxSpec field of the same name.
SPEC_KEYS = tuple(f.name for f in fields(SandboxSpec) if f.init)
CONFIG_KEYS = (*SPEC_KEYS, "env_keep", "pool_size")

# What a kernel needs to behave like one started from a login shell, and
# nothing that authenticates anyone: tokens, agent sockets and cloud
# credentials stay with the server. JPY_SESSION_NAME is how jupyter_server
# tells the kernel which notebook it runs (ipykernel's __session__).
DEFAULT_ENV_KEEP = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_*", "TERM", "USER", "LOGNAME",
                    "SHELL", "TZ", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
                    "JPY_SESSION_NAME")


def check_keys(options: Mapping[str, object], where: str) -> None:
    """Reject an option the provisioner doesn't have, suggesting the one meant."""
    for key, value in options.items():
        if key in CONFIG_KEYS:
            continue
        close = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.5)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise SandboxError(f"{where}: unknown option {key!r} = {value!r}{maybe}. "
                           f"Known options: {', '.join(CONFIG_KEYS)}")


def check_env_keep(value: object, where: str) -> tuple[str, ...]:
    """env_keep as a tuple of names or glob patterns (LC_*)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SandboxError(f"{where}: env_keep {value!r} must be a list of variable names")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name or "=" in name:
            raise SandboxError(f"{where}: env_keep entry {name!r} must be a variable name "
                               "or a pattern such as LC_*")
    return names


def merge_spec(configured: Mapping[str, Any], kernelspec: Mapping[str, Any],
               config_where: str, kernelspec_where: str) -> SandboxSpec:
    """The SandboxSpec of Jupyter's config overridden by the kernelspec's options.

    The configured values are checked alone first, so that an error names
    the file that holds the bad value.
    """
    base = {key: configured[key] for key in SPEC_KEYS}
    try:
        SandboxSpec(**base)
    except SandboxError as e:
        raise SandboxError(f"{config_where}: {e}") from None
    try:
        return SandboxSpec(**{**base, **{k: v for k, v in kernelspec.items() if k in SPEC_KEYS}})
    except SandboxError as e:
        raise SandboxError(f"{kernelspec_where}: {e}") from None


def kernel_env(env: Mapping[str, str], keep: Sequence[str],
               kernelspec_env: Iterable[str]) -> dict[str, str]:
    """The kernelspec's variables and the allow-listed ones of the server's `env`."""
    from_kernelspec = set(kernelspec_env)
    return {name: value for name, value in env.items()
            if name in from_kernelspec or any(fnmatchcase(name, p) for p in keep)}


def sandboxed_kernel_env(env: Mapping[str, str], keep: Sequence[str],
                         kernelspec_env: Iterable[str], spec: SandboxSpec,
                         kernelspec_name: str) -> dict[str, str]:
    """A sandboxed kernel's whole environment, under the provisioner or its launcher."""
    out = kernel_env(env, keep, kernelspec_env)
    # The kernel's parent is the init, PID 1 inside: ipykernel skips its
    # parent poller for PID 1 and, seeing a parent at all, prints no
    # "standalone kernel" banner into the server's log.
    out["JPY_PARENT_PID"] = "1"
    # CUDA and ROCm number the GPUs they can open inside from 0 (devices.py)
    out.update(gpu_env(spec))
    out.update(sandbox_state_env(state_paths(spec, kernelspec_name), out))
    if spec.gpus != "none" and "XDG_CACHE_HOME" in out:
        # CUDA's JIT cache and Triton's kernels would go to home's read-only dot
        # entries (~/.nv, ~/.triton): slow starts, or torch.compile failing
        out.setdefault("CUDA_CACHE_PATH", os.path.join(out["XDG_CACHE_HOME"], "nv"))
        out.setdefault("TRITON_CACHE_DIR", os.path.join(out["XDG_CACHE_HOME"], "triton"))
    return out


# Directories every program shares; hiding one would hide far more than
# Jupyter's files (private_tmp already gives the kernel its own).
SHARED_DIRS = ("/", "/tmp", "/var/tmp")


def hide_runtime_dirs(spec: SandboxSpec, runtime_dirs: Iterable[str],
                      *connection_files: str) -> SandboxSpec:
    """`spec` with Jupyter's runtime dirs hidden and only this kernel's file(s) in them shown.

    The runtime dir holds every kernel's connection file (their HMAC keys)
    and the server's cookie secret. The more specific path wins, so the
    kernel's own connection file stays visible, read-only, inside the
    hidden directory.
    """
    shared = {*SHARED_DIRS, os.path.realpath(tempfile.gettempdir())}
    hidden = [*spec.hidden_paths]
    for directory in runtime_dirs:
        path = os.path.realpath(directory)
        # one not yet made holds no secret; mounts.py wants existing paths
        if path not in hidden and path not in shared and os.path.isdir(path):
            hidden.append(path)
    readonly = [*spec.readonly_paths, *(os.path.realpath(f) for f in connection_files)]
    return replace(spec, hidden_paths=tuple(hidden), readonly_paths=tuple(readonly))


def _expand(entry: str, cwd: str) -> str:
    return os.path.realpath(os.path.expanduser(entry.replace("{cwd}", cwd)))


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def visible_in_sandbox(path: str, spec: SandboxSpec, cwd: str) -> bool:
    """Whether host `path` is the same file inside the sandbox (most specific rule wins)."""
    rules: list[tuple[str, bool]] = [("/", True)]
    if spec.private_tmp:
        # a fresh tmpfs inside: the host's files there are not the kernel's
        rules += [("/tmp", False), ("/var/tmp", False)]
    if spec.private_run:
        rules += [("/run", False)]
    rules += [(_expand(p, cwd), False) for p in spec.hidden_paths]
    rules += [(_expand(p, cwd), True) for p in (*spec.readonly_paths, *spec.readwrite_paths)]
    real = os.path.realpath(path)
    matching = [(len(top), shown) for top, shown in rules if _within(real, top)]
    # The longest entry is the mount applied last; for a path listed as both
    # hidden and visible the more restrictive kind wins, as in mounts.py.
    return max(matching, key=lambda rule: (rule[0], not rule[1]))[1]
