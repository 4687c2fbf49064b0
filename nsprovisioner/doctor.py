"""Check what this host supports for sandboxed kernels, and how to fix what it doesn't.

Facts are gathered for real (namespaces by creating them), then judged by
pure functions, so each diagnosis can also be tested with simulated facts.
Exit status 0 means the shipped python3-sandboxed kernelspec can run here.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import json
import os
import platform
import pwd
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .cgroupfs import CgroupHost
from .devices import choose_gpus, detect_gpus
from .egress import PASTA_FIX, pasta_path, pasta_version
from .errors import SandboxError
from .idmap import subordinate_ranges
from .initexe import INIT_PATH
from .pool import waiting_on_host
from .sandbox import SandboxSpec
from .slurm import job_cgroup, job_id, slurm_fix

SYSCTLS = (
    "user.max_user_namespaces",
    "kernel.unprivileged_userns_clone",
    "kernel.apparmor_restrict_unprivileged_userns",
    "vm.memfd_noexec",
)
OPTIONAL_NAMESPACES = ("ipc", "uts", "cgroup", "net")
# steps whose failure means "no user namespace here" (None: not even tried)
USERNS_STEPS = (None, "clone_child", "unshare_user", "write_id_maps")
SYS_CLONE3 = 435
SYS_CLOSE_RANGE = 436


@dataclass
class HelperFacts:
    path: str | None = None
    setuid: bool = False
    file_caps: bool = False


@dataclass
class CgroupFacts:
    v2_mount: str | None = None
    v2_controllers: list[str] = field(default_factory=list)
    v2_own_dir: str | None = None
    v2_writable: bool = False
    v2_readonly: bool = False   # mounted read-only (containers' default)
    v1: dict[str, bool] = field(default_factory=dict)  # controller -> own dir writable
    v1_own_dirs: dict[str, str] = field(default_factory=dict)  # controller -> own dir


@dataclass
class HostFacts:
    """Everything the diagnosis looks at; tests build these by hand."""

    kernel: str = ""
    euid: int = 0
    user: str = ""
    pidfd: bool = False
    clone3: bool = False
    close_range: bool = False
    memfd_exec: bool = False
    sysctls: dict[str, str | None] = field(default_factory=dict)
    userns_error: str | None = None                 # None: a sandbox started
    failed_step: str | None = None                  # where that first sandbox failed
    namespace_errors: dict[str, str | None] = field(default_factory=dict)
    newuidmap: HelperFacts = field(default_factory=HelperFacts)
    newgidmap: HelperFacts = field(default_factory=HelperFacts)
    subuid: list[tuple[int, int]] = field(default_factory=list)
    subgid: list[tuple[int, int]] = field(default_factory=list)
    cgroup: CgroupFacts = field(default_factory=CgroupFacts)
    libseccomp_error: str | None = None
    init_present: bool = True
    container: str | None = None
    slurm_job: str | None = None        # SLURM_JOB_ID: the server runs in a Slurm job
    pasta: str | None = None            # network = "egress"'s stack, its path
    pasta_version: str | None = None
    egress_error: str | None = None     # None: an egress sandbox started
    gpus: str = ""                                  # HostGpus.describe()
    gpu_nodes: list[str] = field(default_factory=list)
    gpu_missing: list[str] = field(default_factory=list)  # what `gpus = "all"` lacks
    pooled_kernels: dict[int, int] = field(default_factory=dict)  # server pid -> waiting


@dataclass
class Check:
    name: str
    status: str      # PASS, WARN or FAIL
    detail: str
    fix: str = ""
    blocks_kernel: bool = False  # a FAIL here stops python3-sandboxed


# ---- gathering ---------------------------------------------------------------

def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _syscall_exists(number: int, *args: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(number, *args)
    return ctypes.get_errno() != errno.ENOSYS


def _helper(name: str) -> HelperFacts:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin")
    if path is None:
        return HelperFacts()
    mode = os.stat(path).st_mode
    try:
        caps = bool(os.getxattr(path, "security.capability"))
    except OSError:
        caps = False
    return HelperFacts(path, bool(mode & stat.S_ISUID) and os.stat(path).st_uid == 0, caps)


def _memfd_exec() -> bool:
    try:
        fd = os.memfd_create("nsprov-doctor", os.MFD_CLOEXEC | 0x10)  # MFD_EXEC
    except OSError:
        try:
            fd = os.memfd_create("nsprov-doctor", os.MFD_CLOEXEC)
        except OSError:
            return False
    try:
        return bool(os.fstat(fd).st_mode & stat.S_IXUSR)
    finally:
        os.close(fd)


def _container() -> str | None:
    if Path("/.dockerenv").exists():
        return "docker (/.dockerenv exists)"
    if Path("/run/.containerenv").exists():
        return "podman (/run/.containerenv exists)"
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    try:
        environ = Path("/proc/1/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"container="):
                return entry.split(b"=", 1)[1].decode() or "container"
    except OSError:
        pass
    return None


def one_line(e: BaseException) -> str:
    """An error on its check's line: the report keeps one line per check and puts
    the check's own fix on the next ("fix: ...")."""
    return str(e).replace("\n", ". ")


async def _try_spawn(spec: SandboxSpec) -> tuple[str | None, str | None]:
    """(error, failed step) of starting /bin/true in `spec`; (None, None) when it ran."""
    from .spawn import DEVNULL, spawn
    # no writable path: the probe must not depend on the caller's working
    # directory (run from /, "{cwd}" would be the root, which no path may be)
    spec = replace(spec, readwrite_paths=())
    try:
        proc = await spawn(spec, ["/bin/true"], stdout=DEVNULL, stderr=DEVNULL, cwd="/")
        code = await proc.wait()
    except SandboxError as e:
        return one_line(e), e.step
    return (None, None) if code == 0 else (f"/bin/true exited with {code}", "exec")


async def _probe_namespaces(facts: HostFacts) -> None:
    base = ("user", "pid", "mount")
    facts.userns_error, facts.failed_step = await _try_spawn(
        SandboxSpec(namespaces=base, seccomp="off"))
    for name in OPTIONAL_NAMESPACES:
        if facts.userns_error:
            facts.namespace_errors[name] = "not tried: no sandbox could start"
            continue
        spec = (SandboxSpec(namespaces=base, seccomp="off", network="none") if name == "net"
                else SandboxSpec(namespaces=(*base, name), seccomp="off"))
        facts.namespace_errors[name] = (await _try_spawn(spec))[0]
    if facts.pasta and not facts.userns_error:
        facts.egress_error = (await _try_spawn(SandboxSpec(network="egress", seccomp="off")))[0]


def _cgroup_facts() -> CgroupFacts:
    host = CgroupHost.detect()
    facts = CgroupFacts()
    if host.v2 is not None:
        facts.v2_mount = host.v2.mount
        facts.v2_controllers = sorted(host.v2.controllers)
        own = host.v2.directory(host.v2.own_path) if host.v2.own_path else None
        facts.v2_own_dir = own
        facts.v2_writable = bool(own and os.access(own, os.W_OK))
        try:
            facts.v2_readonly = bool(os.statvfs(host.v2.mount).f_flag & os.ST_RDONLY)
        except OSError:
            pass
    for h in host.v1:
        own = h.directory(h.own_path) if h.own_path else None
        for controller in h.controllers:
            facts.v1[controller] = bool(own and os.access(own, os.W_OK))
            if own:
                facts.v1_own_dirs[controller] = own
    return facts


def _gpu_facts(facts: HostFacts) -> None:
    host = detect_gpus()
    facts.gpus = host.describe()
    choice = choose_gpus("all", host)
    facts.gpu_nodes = [f"{host.root}/{node}" for node in choice.nodes]
    facts.gpu_missing = choice.missing if host.any else []


def gather_facts() -> HostFacts:
    """Look at this host (creates a few short-lived sandboxes)."""
    facts = HostFacts(kernel=platform.release(), euid=os.geteuid())
    try:
        facts.user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        facts.user = str(os.getuid())
    try:
        os.close(os.pidfd_open(os.getpid()))
        facts.pidfd = True
    except OSError:
        facts.pidfd = False
    facts.clone3 = _syscall_exists(SYS_CLONE3, 0, 0)
    facts.close_range = _syscall_exists(SYS_CLOSE_RANGE, 2**31 - 1, 2**31 - 1, 0)
    facts.memfd_exec = _memfd_exec()
    facts.sysctls = {name: _sysctl(name) for name in SYSCTLS}
    facts.init_present = os.access(INIT_PATH, os.X_OK)
    facts.newuidmap = _helper("newuidmap")
    facts.newgidmap = _helper("newgidmap")
    facts.subuid = subordinate_ranges(Path("/etc/subuid"), os.getuid())
    facts.subgid = subordinate_ranges(Path("/etc/subgid"), os.getuid())
    facts.cgroup = _cgroup_facts()
    try:
        from .seccomp import build_filter
        build_filter("default", True)
    except (SandboxError, OSError) as e:
        facts.libseccomp_error = one_line(e)
    facts.container = _container()
    facts.slurm_job = job_id()
    facts.pasta, facts.pasta_version = pasta_path(), pasta_version()
    _gpu_facts(facts)
    facts.pooled_kernels = waiting_on_host()
    if facts.init_present and facts.pidfd:
        asyncio.run(_probe_namespaces(facts))
    else:
        facts.userns_error = "not tried: the init or pidfd is missing"
    return facts


# ---- judging -------------------------------------------------------------------

def _userns_fix(facts: HostFacts) -> str:
    s = facts.sysctls
    if s.get("user.max_user_namespaces") == "0":
        return "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/ to keep it)"
    if s.get("kernel.unprivileged_userns_clone") == "0" and facts.euid != 0:
        return "sysctl -w kernel.unprivileged_userns_clone=1 (Debian's switch for unprivileged users)"
    if s.get("kernel.apparmor_restrict_unprivileged_userns") == "1" and facts.euid != 0:
        return ("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give the Jupyter "
                "server's Python an AppArmor profile with the `userns,` rule (Ubuntu 24.04+)")
    if facts.container == "kubernetes":
        return ("this pod's seccomp (RuntimeDefault blocks unshare and namespace clones without "
                "CAP_SYS_ADMIN) or AppArmor profile refuses user namespaces: set the notebook "
                "container's securityContext.seccompProfile to a Localhost profile allowing "
                "unshare, clone, clone3, setns, mount, umount2, pivot_root, mount_setattr, "
                "open_tree, move_mount (or Unconfined) and appArmorProfile Unconfined "
                "(docs/scale-out.md)")
    if facts.container:
        return (f"this runs in a {facts.container} container whose seccomp profile likely blocks "
                "unshare/clone: run it with a profile that allows them (Docker: --security-opt "
                "seccomp=unconfined; Kubernetes: seccompProfile Unconfined or a custom profile)")
    return "check `dmesg` and the sysctls user.max_user_namespaces and kernel.*userns*"


# The one kernel floor (README.md says the same): mount_setattr, which the
# read-only mounts need, came last (pidfd and clone3 5.3, close_range 5.9).
KERNEL_FLOOR = (5, 12)


def kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_kernel(f: HostFacts) -> list[Check]:
    missing = [name for name, ok in (("pidfd", f.pidfd), ("clone3", f.clone3),
                                     ("close_range", f.close_range)) if not ok]
    old = kernel_version(f.kernel) < KERNEL_FLOOR
    floor = ".".join(map(str, KERNEL_FLOOR))
    checks = [Check("kernel", "FAIL" if old or missing else "PASS",
                    f"Linux {f.kernel}" + (f"; missing: {', '.join(missing)}" if missing else "")
                    + (f"; below Linux {floor}" if old else ""),
                    f"upgrade to Linux {floor} or newer (mount_setattr 5.12, close_range 5.9, "
                    "pidfd and clone3 5.3)" if old or missing else "",
                    blocks_kernel=old or bool(missing))]
    noexec = f.sysctls.get("vm.memfd_noexec")
    if f.memfd_exec and noexec in (None, "0", "1"):
        checks.append(Check("memfd exec", "PASS",
                            f"the init runs from a sealed memfd (vm.memfd_noexec={noexec})"))
    else:
        checks.append(Check("memfd exec", "WARN",
                            f"memfd exec refused (vm.memfd_noexec={noexec}): the init runs from "
                            "the installed file, which a sandbox can't write but root outside can",
                            "sysctl -w vm.memfd_noexec=0 (or 1) to exec the init from a sealed copy"))
    return checks


def _start_fix(f: HostFacts) -> str:
    error = f.userns_error or ""
    if f.failed_step == "mount" and "proc" in error and \
            ("EPERM" in error or "Permission denied" in error):
        # the kernel mounts a new procfs only where no part of the old one is covered
        where = ("Kubernetes: securityContext.procMount: Unmasked, which needs hostUsers: "
                 "false (docs/scale-out.md)" if f.container == "kubernetes" else
                 "Docker/Podman: --security-opt systempaths=unconfined; Kubernetes: "
                 "securityContext.procMount: Unmasked")
        return f"/proc is masked (parts of it covered by the container runtime): {where}"
    return "the message names the cause; see docs/troubleshooting.md for the step"


def check_namespaces(f: HostFacts) -> list[Check]:
    if f.userns_error and f.failed_step not in USERNS_STEPS:
        # the user namespace worked; a later step of the first sandbox did not
        return [Check("sandbox start", "FAIL", f"failed at {f.failed_step}: {f.userns_error}",
                      _start_fix(f), blocks_kernel=True)]
    if f.userns_error:
        return [Check("user namespaces", "FAIL", f"could not create one: {f.userns_error}",
                      _userns_fix(f), blocks_kernel=True)]
    checks = [Check("user, pid, mount namespaces", "PASS", "created a sandbox with them")]
    for name in OPTIONAL_NAMESPACES:
        error = f.namespace_errors.get(name)
        if error is None:
            checks.append(Check(f"{name} namespace", "PASS", "created"))
        else:
            checks.append(Check(
                f"{name} namespace", "FAIL" if name != "net" else "WARN", error,
                "check the namespace's user.max_*_namespaces sysctl"
                + ("; without it network = 'none' can't work" if name == "net" else ""),
                blocks_kernel=name != "net"))
    return checks


def check_id_helpers(f: HostFacts) -> list[Check]:
    checks = []
    for name, helper in (("newuidmap", f.newuidmap), ("newgidmap", f.newgidmap)):
        if helper.path is None:
            checks.append(Check(name, "WARN", "not installed: only single-id maps work",
                                "apt-get install uidmap (Fedora: shadow-utils)"))
        elif not (helper.setuid or helper.file_caps) and f.euid != 0:
            checks.append(Check(name, "WARN", f"{helper.path} is neither setuid root nor has "
                                "file capabilities", f"chmod u+s {helper.path}, or "
                                f"setcap cap_set{name[3:6]}id+ep {helper.path}"))
        else:
            checks.append(Check(name, "PASS", helper.path))
    if f.euid == 0:
        checks.append(Check("subordinate ids", "PASS", "root writes any map directly"))
    else:
        for path, ranges in (("/etc/subuid", f.subuid), ("/etc/subgid", f.subgid)):
            if ranges:
                checks.append(Check(path, "PASS", ", ".join(f"{s}-{s + c - 1}" for s, c in ranges)))
            else:
                checks.append(Check(path, "WARN", f"no range for {f.user}: uid_map/gid_map can "
                                    "only map your own id",
                                    f"usermod --add-subuids 100000-165535 --add-subgids "
                                    f"100000-165535 {f.user}"))
    return checks


def check_cgroups(f: HostFacts) -> list[Check]:
    c = f.cgroup
    wanted = ("memory", "pids", "cpu")
    on_v2 = [x for x in wanted if x in c.v2_controllers]
    on_v1 = [x for x in wanted if x in c.v1]
    checks = []
    if not on_v2 and not on_v1:
        checks.append(Check("cgroup controllers", "WARN", "no memory, pids or cpu controller is "
                            "mounted: memory_limit, pids_limit and cpu_limit can't be enforced",
                            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1)"))
        return checks
    if on_v1 and not on_v2:
        checks.append(Check("cgroup version", "WARN", f"{', '.join(on_v1)} are on cgroup v1 "
                            f"({'cgroup2 without controllers at ' + c.v2_mount if c.v2_mount else 'no cgroup2'})",
                            "limits work on v1 too; cgroup v2 (systemd.unified_cgroup_hierarchy=1) "
                            "adds cgroup.kill and CLONE_INTO_CGROUP"))
    else:
        checks.append(Check("cgroup version", "PASS", f"cgroup v2 at {c.v2_mount} with "
                            f"{', '.join(c.v2_controllers) or 'no controllers'}"))
    delegated = ([x for x in on_v2 if c.v2_writable] if on_v2 else
                 [x for x in on_v1 if c.v1.get(x)])
    missing = [x for x in (on_v2 or on_v1) if x not in delegated]
    if f.euid == 0 and not missing:
        checks.append(Check("cgroup delegation", "PASS", "root may create cgroups"))
    elif missing and c.v2_readonly and on_v2:
        checks.append(Check("cgroup delegation", "WARN", f"{', '.join(missing)}: {c.v2_mount} is "
                            "mounted read-only (as container runtimes do): kernels with limits "
                            "fail (strict) or start without them", "rely on the container's or "
                            "pod's own limits (Kubernetes resources.limits) and leave memory_limit,"
                            " pids_limit, cpu_limit unset; per-kernel limits need a writable "
                            "cgroup delegated to the server's user (docs/scale-out.md)"))
    elif missing and f.slurm_job:
        checks.append(Check("cgroup delegation", "WARN", f"{', '.join(missing)} not writable in "
                            f"Slurm job {f.slurm_job}: kernels with these limits fail (strict) or "
                            "start without them", "the cgroups are Slurm's: see the `Slurm job` "
                            "line"))
    elif missing:
        where = c.v2_own_dir if on_v2 else "your cgroup in each v1 hierarchy"
        checks.append(Check("cgroup delegation", "WARN", f"{', '.join(missing)} not delegated to "
                            f"{f.user} ({where} is not writable): kernels with limits fail "
                            "(strict) or start without them", "systemd: `systemctl edit "
                            "user@.service` with [Service] Delegate=yes (or Delegate=memory pids "
                            "cpu), then log in again; or set cgroup_parent to a subtree chowned "
                            f"to {f.user}"))
    else:
        checks.append(Check("cgroup delegation", "PASS", f"{', '.join(delegated)} writable"))
    return checks


def check_slurm(f: HostFacts) -> list[Check]:
    """Inside a Slurm job: whether kernel cgroups (cgroup_parent = "auto") nest in the job's."""
    if f.slurm_job is None:
        return []
    c = f.cgroup
    nested, missing = [], []
    for controller in ("memory", "pids", "cpu"):
        if controller in c.v2_controllers:
            own, writable = c.v2_own_dir, c.v2_writable
        elif controller in c.v1:
            own, writable = c.v1_own_dirs.get(controller), c.v1[controller]
        else:
            continue
        if job_cgroup(own) is not None and writable:
            nested.append(f"{controller} in {own}")
        else:
            missing.append((controller, own or "(not visible)"))
    if not missing:
        return [Check("Slurm job", "PASS", f"job {f.slurm_job}: kernel cgroups nest in the "
                      f"job's: {'; '.join(nested) or 'no controller mounted'}")]
    names = ", ".join(controller for controller, _ in missing)
    controller, own = missing[0]
    return [Check("Slurm job", "WARN", f"job {f.slurm_job}: {names} limits of kernels can't "
                  f"nest in the job's cgroup ({', '.join(own for _, own in missing)}); "
                  f"nested: {'; '.join(nested) or 'none'}", slurm_fix(controller, own, f.slurm_job))]


def check_rest(f: HostFacts) -> list[Check]:
    checks = [Check("sandbox init", "PASS" if f.init_present else "FAIL",
                    str(INIT_PATH) if f.init_present else f"{INIT_PATH} is missing",
                    "" if f.init_present else "reinstall nsprovisioner with a C compiler present",
                    blocks_kernel=not f.init_present)]
    if f.libseccomp_error:
        checks.append(Check("libseccomp", "FAIL", f.libseccomp_error,
                            "apt-get install libseccomp2 (Fedora: libseccomp), or seccomp = 'off'",
                            blocks_kernel=True))
    else:
        checks.append(Check("libseccomp", "PASS", "default seccomp filter built"))
    checks.append(check_egress(f))
    checks.append(check_pools(f))
    checks.append(Check("container", "WARN" if f.container else "PASS",
                        f"inside a {f.container} container" if f.container else "not in a container",
                        "the container needs unshare/clone/mount allowed by its seccomp and "
                        "AppArmor profiles, an unmasked /proc, and delegated cgroups "
                        "(docs/scale-out.md)" if f.container else ""))
    return checks


def check_pools(f: HostFacts) -> Check:
    """Warm kernels (pool_size) hold memory while they wait: say how many there are."""
    if not f.pooled_kernels:
        return Check("warm kernels", "PASS", "none waiting (pool_size is 0, or no server "
                     "of yours keeps a pool)")
    servers = ", ".join(f"{n} in server {pid}" for pid, n in sorted(f.pooled_kernels.items()))
    return Check("warm kernels", "PASS", f"{sum(f.pooled_kernels.values())} waiting "
                 f"({servers}); each holds a started kernel's memory")


def check_egress(f: HostFacts) -> Check:
    """network = "egress" is optional: its absence never blocks the default kernel."""
    if f.pasta is None:
        return Check("egress network", "WARN", "pasta not found: network = 'egress' fails "
                     "(strict) or gives loopback only (strict = false)", PASTA_FIX)
    version = f"pasta {f.pasta_version or '(version unknown)'} at {f.pasta}"
    if f.egress_error:
        return Check("egress network", "WARN", f"{version}, but an egress sandbox failed: "
                     f"{f.egress_error}", "see docs/troubleshooting.md")
    return Check("egress network", "PASS", f"{version}; an egress sandbox started")


def check_gpus(f: HostFacts) -> list[Check]:
    if f.gpu_missing:
        return [Check("GPUs", "WARN", f"{f.gpus}; gpus = 'all' lacks "
                      f"{', '.join(f.gpu_missing)}",
                      "load the driver's modules so that its nodes exist before kernels "
                      "start (nvidia-modprobe -u -c=0 makes /dev/nvidia-uvm)")]
    if not f.gpu_nodes:
        return [Check("GPUs", "PASS", f"{f.gpus}: gpus = 'all' binds nothing")]
    return [Check("GPUs", "PASS", f"{f.gpus}; gpus = 'all' binds {', '.join(f.gpu_nodes)}")]


def diagnose(facts: HostFacts) -> list[Check]:
    return (check_kernel(facts) + check_namespaces(facts) + check_id_helpers(facts)
            + check_cgroups(facts) + check_slurm(facts) + check_rest(facts) + check_gpus(facts))


def can_run_kernel(checks: list[Check]) -> bool:
    return not any(c.status == "FAIL" and c.blocks_kernel for c in checks)


# ---- the verb ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts and checks as JSON")


def main(args: argparse.Namespace) -> int:
    facts = gather_facts()
    checks = diagnose(facts)
    ok = can_run_kernel(checks)
    if args.json:
        print(json.dumps({"facts": asdict(facts), "checks": [asdict(c) for c in checks],
                          "can_run_kernel": ok}, indent=2))
    else:
        for c in checks:
            print(f"{c.status:<5} {c.name}: {c.detail}")
            if c.fix and c.status != "PASS":
                print(f"      fix: {c.fix}")
        print("python3-sandboxed can run here" if ok else
              "python3-sandboxed can NOT run here: fix the FAIL lines above")
    return 0 if ok else 1
