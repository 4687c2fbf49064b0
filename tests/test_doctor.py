"""`nsprovisioner doctor`: for real on this host, and on simulated hosts."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

from nsprovisioner.doctor import (
    CgroupFacts,
    Check,
    HelperFacts,
    HostFacts,
    can_run_kernel,
    diagnose,
)

CLI = [sys.executable, "-m", "nsprovisioner.cli"]


def healthy_host(**changes: object) -> HostFacts:
    """A host where everything works, as an unprivileged user on cgroup v2."""
    facts = HostFacts(
        kernel="6.8.0", euid=1000, user="alice", pidfd=True, clone3=True, close_range=True,
        memfd_exec=True,
        sysctls={"user.max_user_namespaces": "63000", "kernel.unprivileged_userns_clone": "1",
                 "kernel.apparmor_restrict_unprivileged_userns": "0", "vm.memfd_noexec": "0"},
        namespace_errors=dict.fromkeys(("ipc", "uts", "cgroup", "net")),
        newuidmap=HelperFacts("/usr/bin/newuidmap", setuid=True),
        newgidmap=HelperFacts("/usr/bin/newgidmap", setuid=True),
        subuid=[(100000, 65536)], subgid=[(100000, 65536)],
        cgroup=CgroupFacts(v2_mount="/sys/fs/cgroup", v2_controllers=["cpu", "memory", "pids"],
                           v2_own_dir="/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice",
                           v2_writable=True),
        pasta="/usr/bin/pasta", pasta_version="0.0~git20230309.7c7625d-1",
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def by_name(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.name == name)


def test_healthy_host_passes_everything() -> None:
    checks = diagnose(healthy_host())
    assert [c for c in checks if c.status != "PASS"] == []
    assert can_run_kernel(checks)


def test_apparmor_restriction_is_diagnosed_with_its_fix() -> None:
    facts = healthy_host(userns_error="unshare_user: Permission denied (EPERM)",
                         failed_step="unshare_user")
    facts.sysctls["kernel.apparmor_restrict_unprivileged_userns"] = "1"
    check = by_name(diagnose(facts), "user namespaces")
    assert check.status == "FAIL"
    assert "apparmor_restrict_unprivileged_userns=0" in check.fix
    assert "userns" in check.fix
    assert not can_run_kernel(diagnose(facts))


def test_debian_sysctl_off_is_diagnosed() -> None:
    facts = healthy_host(userns_error="EPERM")
    facts.sysctls["kernel.unprivileged_userns_clone"] = "0"
    assert "kernel.unprivileged_userns_clone=1" in by_name(diagnose(facts), "user namespaces").fix


def test_max_user_namespaces_zero_is_diagnosed_first() -> None:
    facts = healthy_host(userns_error="ENOSPC")
    facts.sysctls["user.max_user_namespaces"] = "0"
    facts.sysctls["kernel.unprivileged_userns_clone"] = "0"
    assert "user.max_user_namespaces=15000" in by_name(diagnose(facts), "user namespaces").fix


def test_container_seccomp_profile_is_suspected_when_sysctls_allow() -> None:
    facts = healthy_host(userns_error="EPERM", container="docker")
    fix = by_name(diagnose(facts), "user namespaces").fix
    assert "seccomp" in fix and "docker" in fix


def test_a_later_step_failing_is_not_blamed_on_user_namespaces() -> None:
    facts = healthy_host(userns_error="sandbox grandchild failed at mount (...): ENOSYS. "
                         "Read-only mounts need mount_setattr (Linux 5.12 or newer)",
                         failed_step="mount")
    checks = diagnose(facts)
    check = by_name(checks, "sandbox start")
    assert check.status == "FAIL" and "mount" in check.detail and "5.12" in check.detail
    assert not [c for c in checks if c.name == "user namespaces"]
    assert not can_run_kernel(checks)


def test_missing_newuidmap_warns_with_the_package() -> None:
    checks = diagnose(healthy_host(newuidmap=HelperFacts(), newgidmap=HelperFacts()))
    check = by_name(checks, "newuidmap")
    assert check.status == "WARN"
    assert "apt-get install uidmap" in check.fix
    assert can_run_kernel(checks)  # single-id maps still work


def test_helper_without_setuid_warns() -> None:
    check = by_name(diagnose(healthy_host(newuidmap=HelperFacts("/usr/bin/newuidmap"))),
                    "newuidmap")
    assert check.status == "WARN" and "chmod u+s" in check.fix


def test_no_subuid_range_names_usermod() -> None:
    check = by_name(diagnose(healthy_host(subuid=[])), "/etc/subuid")
    assert check.status == "WARN" and "usermod --add-subuids" in check.fix and "alice" in check.fix


def test_cgroup_v1_only_host() -> None:
    cg = CgroupFacts(v2_mount="/sys/fs/cgroup/unified", v2_controllers=[],
                     v1={"memory": True, "pids": True, "cpu": True})
    checks = diagnose(healthy_host(cgroup=cg))
    version = by_name(checks, "cgroup version")
    assert version.status == "WARN" and "cgroup v1" in version.detail
    assert by_name(checks, "cgroup delegation").status == "PASS"


def test_cgroup_not_delegated_names_systemd_delegate() -> None:
    cg = CgroupFacts(v2_mount="/sys/fs/cgroup", v2_controllers=["cpu", "memory", "pids"],
                     v2_own_dir="/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope",
                     v2_writable=False)
    checks = diagnose(healthy_host(cgroup=cg))
    check = by_name(checks, "cgroup delegation")
    assert check.status == "WARN"
    assert "Delegate=yes" in check.fix and "session-3.scope" in check.detail
    assert can_run_kernel(checks)  # only kernels with limits need it


def test_no_libseccomp_blocks_the_default_kernel() -> None:
    checks = diagnose(healthy_host(libseccomp_error="libseccomp.so.2: cannot open"))
    assert "libseccomp2" in by_name(checks, "libseccomp").fix
    assert not can_run_kernel(checks)


def test_a_kernel_below_the_floor_fails_even_with_every_probe_passing() -> None:
    checks = diagnose(healthy_host(kernel="5.10.0-28-amd64"))
    assert by_name(checks, "kernel").status == "FAIL"
    assert "5.12" in by_name(checks, "kernel").fix
    assert not can_run_kernel(checks)


def test_old_kernel_without_pidfd_fails() -> None:
    checks = diagnose(healthy_host(pidfd=False, clone3=False, close_range=False, kernel="4.19"))
    assert by_name(checks, "kernel").status == "FAIL"
    assert not can_run_kernel(checks)


def test_doctor_on_this_host() -> None:
    """This machine runs the whole suite, so the doctor must say it can run kernels."""
    result = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS  user, pid, mount namespaces" in result.stdout
    assert "python3-sandboxed can run here" in result.stdout
    lines = result.stdout.splitlines()
    for line, following in itertools.pairwise(lines):  # every WARN/FAIL is followed by its fix
        if line.startswith(("WARN", "FAIL")):
            assert following.strip().startswith("fix: "), line


def test_doctor_json() -> None:
    result = subprocess.run([*CLI, "doctor", "--json"], capture_output=True, text=True,
                            timeout=120, check=True)
    report = json.loads(result.stdout)
    assert report["can_run_kernel"] is True
    assert report["facts"]["pidfd"] is True
    assert {c["status"] for c in report["checks"]} <= {"PASS", "WARN", "FAIL"}


def test_missing_pasta_warns_with_the_fix_and_blocks_nothing() -> None:
    checks = diagnose(healthy_host(pasta=None))
    egress = by_name(checks, "egress network")
    assert egress.status == "WARN" and "apt-get install passt" in egress.fix
    assert can_run_kernel(checks)


# ---- a simulated Kubernetes pod (docs/scale-out.md ties each requirement to these lines) ----

def pod(**changes: object) -> HostFacts:
    """A notebook pod of zero-to-jupyterhub: cgroup v2 private to the container, root-owned."""
    return healthy_host(container="kubernetes", newuidmap=HelperFacts(), newgidmap=HelperFacts(),
                        subuid=[], subgid=[], **changes)


def test_pod_with_a_masked_proc_names_procmount_unmasked() -> None:
    checks = diagnose(pod(userns_error="sandbox grandchild failed at mount (mount proc on "
                          "/proc): Operation not permitted (EPERM)", failed_step="mount"))
    check = by_name(checks, "sandbox start")
    assert check.status == "FAIL" and "procMount: Unmasked" in check.fix
    assert "hostUsers: false" in check.fix
    assert not can_run_kernel(checks)


def test_pod_whose_seccomp_blocks_unshare_names_the_profile() -> None:
    checks = diagnose(pod(userns_error="unshare_user: Operation not permitted (EPERM)",
                          failed_step="unshare_user"))
    check = by_name(checks, "user namespaces")
    assert check.status == "FAIL"
    assert "seccompProfile" in check.fix and "Localhost" in check.fix and "unshare" in check.fix
    assert "appArmorProfile" in check.fix
    assert not can_run_kernel(checks)


def test_pod_with_a_read_only_cgroupfs_warns_and_names_the_pods_limits() -> None:
    cg = CgroupFacts(v2_mount="/sys/fs/cgroup", v2_controllers=["cpu", "memory", "pids"],
                     v2_own_dir="/sys/fs/cgroup", v2_writable=False, v2_readonly=True)
    checks = diagnose(pod(cgroup=cg))
    check = by_name(checks, "cgroup delegation")
    assert check.status == "WARN" and "read-only" in check.detail
    assert "resources.limits" in check.fix and "Delegate=yes" not in check.fix
    assert by_name(checks, "container").status == "WARN"
    assert can_run_kernel(checks)  # kernels without limits still start


def test_healthy_pod_runs_kernels() -> None:
    """What docs/scale-out.md's values give: only the WARNs that block nothing."""
    checks = diagnose(pod())
    assert can_run_kernel(checks)
    assert {c.name for c in checks if c.status != "PASS"} <= {
        "container", "newuidmap", "newgidmap", "/etc/subuid", "/etc/subgid"}


# ---- inside a Slurm job ----------------------------------------------------------------

SLURM_V1 = "/sys/fs/cgroup/{c}/slurm_n1/uid_1000/job_42/step_0"


def test_slurm_job_with_task_cgroup_nests_memory_and_names_what_cant() -> None:
    cg = CgroupFacts(v2_mount="/sys/fs/cgroup/unified",
                     v1={"memory": True, "pids": False, "cpu": False},
                     v1_own_dirs={"memory": SLURM_V1.format(c="memory") + "/task_0",
                                  "pids": "/sys/fs/cgroup/pids", "cpu": "/sys/fs/cgroup/cpu"})
    checks = diagnose(healthy_host(cgroup=cg, slurm_job="42"))
    check = by_name(checks, "Slurm job")
    assert check.status == "WARN"
    delegation = by_name(checks, "cgroup delegation")  # not systemd's fix inside a job
    assert "Slurm job" in delegation.fix and "Delegate=yes" not in delegation.fix
    assert "memory in /sys/fs/cgroup/memory/slurm_n1/uid_1000/job_42/step_0/task_0" in check.detail
    assert "pids, cpu" in check.detail
    assert "Slurm job 42" in check.fix and "no job cgroup" in check.fix


def test_slurm_job_without_a_memory_cgroup_names_constrainramspace() -> None:
    cg = CgroupFacts(v1={"memory": False}, v1_own_dirs={"memory": "/sys/fs/cgroup/memory"})
    check = by_name(diagnose(healthy_host(cgroup=cg, slurm_job="7")), "Slurm job")
    assert check.status == "WARN"
    assert "ConstrainRAMSpace=yes" in check.fix and "TaskPlugin=task/cgroup" in check.fix


def test_slurm_job_on_v2_not_delegated_names_the_job_cgroup() -> None:
    own = "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_9/step_0/user/task_0"
    cg = CgroupFacts(v2_mount="/sys/fs/cgroup", v2_controllers=["cpu", "memory", "pids"],
                     v2_own_dir=own, v2_writable=False)
    check = by_name(diagnose(healthy_host(cgroup=cg, slurm_job="9")), "Slurm job")
    assert check.status == "WARN" and own in check.detail
    assert "not writable" in check.fix and "cgroup/v1" in check.fix


def test_no_slurm_line_outside_a_job() -> None:
    assert not [c for c in diagnose(healthy_host()) if c.name == "Slurm job"]
