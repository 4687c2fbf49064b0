"""SandboxError: one failure, with the step that failed, errno, and a fix.

Every stage reports a failure as a record (stage, step, errno, detail); this
module turns it into the message a user reads, naming the likely cause and
what to do about it.
"""

from __future__ import annotations

import errno as errno_codes
import os
from pathlib import Path

from ._nsexec import ffi

STAGES = {0: "parent", 1: "child", 2: "grandchild", 3: "init"}


def _step_names() -> dict[int, str]:
    elements: dict[int, str] = ffi.typeof("enum nsx_step").elements
    return {value: name.removeprefix("NSX_STEP_").lower() for value, name in elements.items()}


STEP_NAMES = _step_names()
STEP_VALUES = {name: value for value, name in STEP_NAMES.items()}


class SandboxError(RuntimeError):
    """The sandbox could not be started (or a value for it is invalid)."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        errno: int = 0,
        stage: str | None = None,
        hint: str | None = None,
        grandchild_pid: int = 0,
    ) -> None:
        self.step = step
        self.errno = errno
        self.stage = stage
        self.hint = hint
        self.grandchild_pid = grandchild_pid
        text = message
        if step and step not in message:
            text += f" (step {step})"
        if errno:
            text += f": {os.strerror(errno)} ({errno_codes.errorcode.get(errno, errno)})"
        self.cause = text
        if hint:  # on its own line: a long cause (a cgroup path) must not hide the fix
            text += f"\n{hint[0].upper()}{hint[1:]}"
        super().__init__(text)

    @classmethod
    def from_record(cls, stage: int, step: int, err: int, detail: str,
                    grandchild_pid: int = 0) -> SandboxError:
        step_name = STEP_NAMES.get(step, f"step {step}")
        stage_name = STAGES.get(stage, f"stage {stage}")
        return cls(
            f"sandbox {stage_name} failed at {step_name} ({detail})",
            step=step_name,
            errno=err,
            stage=stage_name,
            hint=diagnose(step_name, err, detail),
            grandchild_pid=grandchild_pid,
        )


def _read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def explain_userns_failure(err: int) -> str:
    """Why creating a user namespace failed on this host, and the fix."""
    if err == errno_codes.ENOSPC:
        return (
            "the limit on user namespaces is reached; raise it with "
            "`sysctl -w user.max_user_namespaces=15000`"
        )
    if _read_sysctl("user.max_user_namespaces") == "0":
        return (
            "user namespaces are disabled (user.max_user_namespaces = 0); enable them with "
            "`sysctl -w user.max_user_namespaces=15000`"
        )
    if _read_sysctl("kernel.unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        return (
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0); "
            "enable them with `sysctl -w kernel.unprivileged_userns_clone=1`"
        )
    if _read_sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1" and os.geteuid() != 0:
        return (
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns = 1); allow them with "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile "
            "with the `userns` permission for the Jupyter server's Python"
        )
    return (
        "user namespaces are not allowed here; inside a container this usually means its "
        "seccomp profile blocks unshare/clone: run the container with a profile that allows "
        "them (e.g. `--security-opt seccomp=unconfined`); `jupyter nsprovisioner doctor` "
        "checks the host"
    )


def diagnose(step: str, err: int, detail: str) -> str | None:
    """The likely cause of a failed step and its fix, or None."""
    if step == "unshare_user" and err in (errno_codes.EPERM, errno_codes.ENOSPC,
                                          errno_codes.EUSERS, errno_codes.EINVAL):
        return explain_userns_failure(err)
    if step == "unshare_namespaces" and err in (errno_codes.ENOSPC, errno_codes.EUSERS):
        return (
            "a namespace limit is reached: see the user.max_*_namespaces sysctls "
            "(e.g. `sysctl -w user.max_pid_namespaces=15000`)"
        )
    if step in ("exec", "init_exec"):
        if err == errno_codes.ENOENT:
            return "the command was not found inside the sandbox: check argv[0] and PATH"
        if err in (errno_codes.EACCES, errno_codes.ENOEXEC, errno_codes.EPERM):
            return "the command is not executable inside the sandbox: check its mode and mounts"
    if step == "chdir" and err in (errno_codes.ENOENT, errno_codes.ENOTDIR, errno_codes.EACCES):
        return "the working directory does not exist inside the sandbox or is not a directory"
    if step == "mount" and err == errno_codes.ELOOP:
        return ("a configured path is (or became) a symlink; paths are bound without following "
                "symlinks so that a mask can't be redirected: name the real path")
    if step == "mount" and err == errno_codes.ENOSYS:
        return "read-only mounts need mount_setattr (Linux 5.12 or newer)"
    if step == "mount" and err == errno_codes.EPERM and "cgroup" in detail:
        return (
            "a cgroupfs can't be mounted in the sandbox's cgroup namespace here (an LSM or a "
            "container forbids it), so /sys/fs/cgroup can't show the sandbox's limits; remove "
            "\"cgroup\" from namespaces to start with /sys/fs/cgroup empty instead"
        )
    if step == "mount" and err == errno_codes.EPERM and "proc" in detail:
        return (
            "a fresh /proc can't be mounted: /proc is partly covered on this host (common in "
            "containers); run the server with an unmasked /proc"
        )
    return None
