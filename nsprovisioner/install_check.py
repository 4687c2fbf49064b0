"""Whether this host can give a kernelspec's sandbox what its options ask.

`jupyter nsprovisioner install` asks before it writes the kernelspec: a user
without cgroup delegation who installs one with memory_limit = 1G would
otherwise get a kernel that never starts. The facts and the checks are
doctor's (doctor.py); this module keeps those that the options depend on,
each named after the option that needs it, with doctor's fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .doctor import (
    OPTIONAL_NAMESPACES,
    Check,
    HostFacts,
    check_cgroups,
    check_egress,
    check_gpus,
    check_id_helpers,
    check_kernel,
    check_namespaces,
    check_rest,
)
from .idmap import needs_helper
from .sandbox import SandboxSpec

LIMIT_OPTIONS = {"memory": "memory_limit", "pids": "pids_limit", "cpu": "cpu_limit"}


@dataclass(frozen=True)
class Problem:
    """What the host lacks for `option` ("every kernel" when nothing would start)."""

    option: str
    detail: str
    fix: str

    def describe(self) -> str:
        return f"{self.option}: {self.detail}\n  fix: {self.fix}"


def _problems(option: str, checks: list[Check]) -> list[Problem]:
    return [Problem(option, f"{c.name}: {c.detail}", c.fix) for c in checks
            if c.status != "PASS"]


def problems_for(spec: SandboxSpec, options: Mapping[str, Any], f: HostFacts) -> list[Problem]:
    """What stands between `spec` (the kernelspec's `options` over the defaults) and a
    kernel that starts with all of it on the host `f` describes."""
    found = _problems("every kernel", [c for c in check_kernel(f) if c.name == "kernel"])
    namespaces = check_namespaces(f)
    optional = {f"{name} namespace" for name in OPTIONAL_NAMESPACES}
    found += _problems("every kernel", [c for c in namespaces if c.name not in optional])
    for name in ("ipc", "uts", "cgroup"):
        if name in spec.namespaces:
            found += _problems(f"namespaces ({name})",
                               [c for c in namespaces if c.name == f"{name} namespace"])
    if spec.network != "host":
        found += _problems(f"network = {spec.network!r}",
                           [c for c in namespaces if c.name == "net namespace"])
    if spec.network == "egress":
        found += _problems("network = 'egress'", [check_egress(f)])
    rest = check_rest(f)
    found += _problems("every kernel", [c for c in rest if c.name == "sandbox init"])
    if spec.seccomp != "off":
        found += _problems(f"seccomp = {spec.seccomp!r}", [c for c in rest if c.name == "libseccomp"])
    if (needs_helper(list(spec.uid_ranges), f.euid)
            or needs_helper(list(spec.gid_ranges), os.getegid())):
        found += _problems("uid_map / gid_map", check_id_helpers(f))
    if spec.gpus != "none":
        found += _problems(f"gpus = {spec.gpus!r}", check_gpus(f))
    for controller, key in LIMIT_OPTIONS.items():
        if options.get(key) is not None:
            found += _limit_problems(controller, f"{key} = {options[key]}", spec, f)
    return found


def _limit_problems(controller: str, option: str, spec: SandboxSpec,
                    f: HostFacts) -> list[Problem]:
    cg = f.cgroup
    if controller in cg.v2_controllers:
        usable = f.euid == 0 or cg.v2_writable
    elif controller in cg.v1:
        usable = f.euid == 0 or cg.v1[controller]
    else:
        usable = False
    if usable:
        return []
    consequence = ("its kernels start without the limit (strict = false)" if not spec.strict
                   else "its kernels fail to start (strict)")
    if controller not in cg.v2_controllers and controller not in cg.v1:
        why = f"no {controller} controller is mounted"
    else:
        why = f"the {controller} controller is not delegated to {f.user}"
    fixes = [c.fix for c in check_cgroups(f) if c.status != "PASS"
             and c.name in ("cgroup controllers", "cgroup delegation")]
    return [Problem(option, f"{why}: {consequence}",
                    fixes[-1] if fixes else "`jupyter nsprovisioner doctor` says why")]
