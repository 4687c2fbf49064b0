"""JupyterHub on a Slurm cluster, every kernel sandboxed inside its user's batch job.

A one-node cluster (tests/slurm_cluster.py: Debian's slurmctld, slurmd and
munge, config and key in a temp dir) runs each user's single-user server as
a Slurm job submitted by batchspawner.SlurmSpawner; the shipped opt-in config
makes namespace-provisioner the default. Through the hub's proxy and
websocket the test starts kernels, runs code in them, and checks from the
host what the code could not see: the namespaces, the uid outside, the
cgroups nested in the job's, the limits, and what scancel leaves behind.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_process
from tests.slurm_cluster import SlurmCluster, free_port
from tests.test_jupyterhub import Hub, hub_config, sandbox_all_config

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="Slurm's daemons and the test users need root")

USERS = ("nsps-alice", "nsps-bob")
JOB_MEMORY = "900M"            # each server's job (--mem): the limit over all its kernels
KERNEL_MEMORY = 650 << 20      # NamespaceProvisioner.memory_limit: each kernel's own


class SlurmHub(Hub):
    def __init__(self, url: str, token: str, cluster: SlurmCluster, pid: int) -> None:
        super().__init__(url, token)
        self.cluster = cluster
        self.pid = pid

    def job_pids(self, uid: int) -> list[int]:
        """The user's live processes but those the hub runs as the user (runuser squeue ...).

        Not zombies either: what exited after its parent did waits, holding no memory
        or cgroup, for the machine's init to reap it (some inits, as in the VMs this
        was written on, do that late)."""
        def hubs(pid: int) -> bool:
            while pid > 1:
                if pid == self.pid:
                    return True
                pid = parent_of(pid)
            return False

        return [p for p in pids_of(uid) if not hubs(p) and not zombie(p)]

    def job(self, user: str) -> str:
        jobs = self.cluster.run("squeue", "-h", "-u", user, "-o", "%i").stdout.split()
        assert len(jobs) == 1, f"{user}'s jobs: {jobs}"
        return jobs[0]

    def server_running(self, user: str) -> bool:
        model = self.request("GET", f"/hub/api/users/{user}")
        assert isinstance(model, dict)
        return "" in model.get("servers", {})

    def kernel(self, user: str) -> str:
        """A new kernel in the user's server (started first when it isn't)."""
        if not self.server_running(user):
            self.start_server(user)
        kernel = self.request("POST", f"/user/{user}/api/kernels", {"name": "python3"})
        assert isinstance(kernel, dict)
        return str(kernel["id"])

    def run(self, user: str, kernel: str, code: str) -> object:
        """Execute `code`, which prints one JSON value; that value."""
        return json.loads(self.execute(user, kernel, code))


def pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
        except FileNotFoundError:
            pass
    return pids


@pytest.fixture(scope="module")
def hub(request: pytest.FixtureRequest) -> Iterator[SlurmHub]:
    if shutil.which("configurable-http-proxy") is None:
        pytest.fail("configurable-http-proxy is missing: scripts/test-all.sh installs it")
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if runuser is None:
        pytest.fail("runuser is missing: apt-get install util-linux")
    pytest.importorskip("batchspawner", reason="scripts/slurm-deps.sh installs batchspawner")
    workdir = Path(tempfile.mkdtemp(prefix="nsprov-slurm-"))
    os.chmod(workdir, 0o755)  # the users' sbatch reads slurm.conf there
    cluster = SlurmCluster(workdir / "slurm")
    (workdir / "slurm").mkdir()
    hubdir = workdir / "hub"
    hubdir.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        for user in USERS:
            subprocess.run(["useradd", "--create-home", user], check=True, capture_output=True)
        cluster.start()
        token = secrets.token_hex(16)
        port = free_port()
        bindir = os.path.dirname(sys.executable)
        (hubdir / "jupyterhub_config.py").write_text(hub_config(hubdir, port, token, USERS) + f"""
c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
# sbatch runs as the user (a fresh Debian has no sudo, batchspawner's default)
c.SlurmSpawner.exec_prefix = "{runuser} -u {{username}} --"
c.SlurmSpawner.req_partition = "nsprov"
c.SlurmSpawner.req_memory = "{JOB_MEMORY}"
c.SlurmSpawner.req_nprocs = "1"
c.SlurmSpawner.batchspawner_singleuser_cmd = "{bindir}/batchspawner-singleuser"
c.SlurmSpawner.startup_poll_interval = 0.2
c.Spawner.cmd = ["{bindir}/jupyterhub-singleuser"]
c.Spawner.args = ["--config={sandbox_all_config()}",
                  "--NamespaceProvisioner.memory_limit={KERNEL_MEMORY}"]
c.Spawner.default_url = "/tree"
c.Spawner.environment = {{"PATH": "{bindir}:/usr/bin:/bin", "SLURM_CONF": "{cluster.conf}"}}
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.Spawner.poll_interval = 1
# the cluster's teardown cancels the jobs: the hub's own stop would wait for a
# slurmctld that is gone
c.JupyterHub.cleanup_servers = False
""")
        log = open(hubdir / "hub.log", "w")  # noqa: SIM115 - the hub keeps it
        proc = subprocess.Popen([f"{bindir}/jupyterhub", "-f", str(hubdir / "jupyterhub_config.py")],
                                cwd=hubdir, stdout=log, stderr=subprocess.STDOUT,
                                # squeue and scancel run with the hub's environment
                                env={**cluster.env, "PATH": f"{bindir}:{os.environ['PATH']}"})
        log.close()
        hub = SlurmHub(f"http://127.0.0.1:{port}", token, cluster, proc.pid)
        deadline = time.monotonic() + 60
        while True:
            try:
                hub.request("GET", "/hub/api/")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the hub did not start:\n" + (hubdir / "hub.log").read_text())
                time.sleep(0.3)
        for user in USERS:
            try:
                hub.request("POST", f"/hub/api/users/{user}")
            except urllib.error.HTTPError as e:
                if e.code != 409:  # 409: allowed_users already made them
                    raise
        failed = request.session.testsfailed
        yield hub
        if request.session.testsfailed > failed:
            show_logs(hubdir, cluster)
    except BaseException:
        show_logs(hubdir, cluster)
        raise
    finally:
        cluster.stop()  # scancels every job: the servers go before the hub
        if proc is not None:
            stop_process(proc, 30)
        for user in USERS:
            try:
                uid = pwd.getpwnam(user).pw_uid
            except KeyError:
                continue
            for pid in pids_of(uid):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["userdel", "-r", user], check=False, capture_output=True)
            shutil.rmtree(f"/tmp/nsprov-{uid}", ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        left = [str(p) for p in cluster.cgroup_roots()]
        assert not left, f"cgroups left behind: {left}"


def show_logs(hubdir: Path, cluster: SlurmCluster) -> None:
    """The hub's and slurmd's logs, and the jobs' outputs, for a failure's report."""
    if (hubdir / "hub.log").exists():
        lines = [line for line in (hubdir / "hub.log").read_text().splitlines()
                 if " 200 GET /hub/api/users/" not in line]  # the test's own polling
        sys.stderr.write("---- hub.log\n" + "\n".join(lines)[-12000:] + "\n")
    sys.stderr.write("---- slurmd.log\n" + cluster.log("slurmd.log"))
    for user in USERS:
        for out in Path("/home", user).glob("jupyterhub_slurmspawner_*.log"):
            sys.stderr.write(f"---- {out}\n" + out.read_text(errors="replace")[-4000:])


# ---- what the tests read on the host --------------------------------------------------

NAMESPACES = ("pid", "user", "mnt")

REPORT = r"""
import json, os
print(json.dumps({
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "user", "mnt")},
    "pid": os.getpid(),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "cmdlines": [open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
                 for p in os.listdir("/proc") if p.isdigit()],
    "tmp": sorted(os.listdir("/tmp")),
}))
"""


def ns_of(pid: int, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def host_pid(report: dict[str, object]) -> int:
    """The host pid of the process that wrote `report` (its pid namespace and inner pid)."""
    ns = report["ns"]
    assert isinstance(ns, dict)
    for entry in os.listdir("/proc"):
        try:
            if not entry.isdigit() or ns_of(int(entry), "pid") != ns["pid"]:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        if int(nspid[-1]) == report["pid"]:
            return int(entry)
    raise AssertionError(f"no host process has the kernel's pid namespace: {report}")


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise AssertionError(f"{pid} has no {controller} cgroup")


def server_pid(uid: int) -> int:
    """The user's single-user server: the Python running batchspawner-singleuser, which
    runs jupyterhub-singleuser in its own process (srun and the job's shell hold the same
    words in their command lines)."""
    for pid in pids_of(uid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]).startswith(b"python") and \
                any(a.endswith(b"batchspawner-singleuser") for a in argv[1:2]):
            return pid
    raise AssertionError(f"uid {uid} has no single-user server")


def parent_of(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def describe(pid: int) -> str:
    """A leftover process, for an assertion's message."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
        parent = parent_of(pid)
        parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return f"{cmdline} ({state}; parent {parent} {parent_cmd})"
    except (OSError, StopIteration):
        return "(gone)"


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


def memcg(path: str, name: str) -> int:
    return int(Path(f"/sys/fs/cgroup/memory{path}/{name}").read_text())


def peak_reset(*paths: str) -> None:
    for path in paths:
        Path(f"/sys/fs/cgroup/memory{path}/memory.max_usage_in_bytes").write_text("0")


def reached_limit(path: str) -> bool:
    """Whether usage hit the cgroup's limit since peak_reset(), the mark of its OOM
    (memory.oom_control counts a kill in the victim's cgroup, not the limit's)."""
    limit = memcg(path, "memory.limit_in_bytes")
    return memcg(path, "memory.max_usage_in_bytes") > limit - (1 << 20)


# ---- the tests ------------------------------------------------------------------------

def test_doctor_inside_a_job_reports_the_jobs_cgroups(hub: SlurmHub) -> None:
    """Before the servers take the node's two CPUs: `doctor` as a job step of its own."""
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert runuser is not None
    result = subprocess.run(
        [runuser, "-u", USERS[0], "--", "srun", "--mem=300M", "-p", "nsprov",
         sys.executable, "-m", "nsprovisioner.cli", "doctor", "--json"],
        capture_output=True, text=True, env=hub.cluster.env, cwd="/tmp", timeout=120,
        check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    slurm = next(c for c in report["checks"] if c["name"] == "Slurm job")
    job = report["facts"]["slurm_job"]
    # this host's Slurm (cgroup/v1): memory nests in the job, pids and cpu have no job cgroup
    assert f"memory in /sys/fs/cgroup/memory/slurm_{hub.cluster.node}/uid_" in slurm["detail"]
    assert f"/job_{job}/" in slurm["detail"]
    assert slurm["status"] == "WARN" and "pids, cpu" in slurm["detail"]
    assert "no job cgroup in the hierarchy of pids" in slurm["fix"]


def test_each_kernel_is_sandboxed_inside_its_users_job(hub: SlurmHub) -> None:
    alice, bob = USERS
    alice_kernel = hub.kernel(alice)
    report = hub.run(alice, alice_kernel, REPORT)
    assert isinstance(report, dict)
    alice_uid = pwd.getpwnam(alice).pw_uid
    job = hub.job(alice)
    server, kernel = server_pid(alice_uid), host_pid(report)

    # inside the job: the kernel's cgroup nests in the job's (memory and freezer, which
    # task/cgroup and proctrack/cgroup made for the job)
    for controller in ("memory", "freezer"):
        job_cgroup = cgroup_of(server, controller)
        assert f"/job_{job}/" in job_cgroup, job_cgroup
        assert cgroup_of(kernel, controller).startswith(job_cgroup + "/"), controller
    # its own namespaces, not the job's, and the user's uid outside
    for name in NAMESPACES:
        assert ns_of(kernel, name) != ns_of(server, name), name
    assert uid_of(kernel) == alice_uid
    assert len(report["procs"]) <= 4  # init, kernel, maybe a helper: nothing of the job

    hub.run(alice, alice_kernel, "open('/tmp/alice-secret', 'w').write('s'); "
            "os = __import__('os'); fd = os.open(os.path.expanduser('~/alice-notes'), "
            "os.O_WRONLY | os.O_CREAT, 0o600); os.write(fd, b'notes'); print(1)")
    bob_kernel = hub.kernel(bob)
    assert hub.job(bob) != job
    bob_report = hub.run(bob, bob_kernel, REPORT)
    notes = f"{pwd.getpwnam(alice).pw_dir}/alice-notes"
    assert hub.run(bob, bob_kernel, f"""
import json
try:
    open("{notes}").read()
    print(json.dumps("read"))
except OSError as e:
    print(json.dumps(type(e).__name__))
""") == "PermissionError"
    assert isinstance(bob_report, dict)
    bob_kernel_pid = host_pid(bob_report)
    assert uid_of(bob_kernel_pid) == pwd.getpwnam(bob).pw_uid
    assert "alice-secret" not in bob_report["tmp"]
    assert len(bob_report["procs"]) <= 4
    assert not [c for c in bob_report["cmdlines"] if "singleuser" in c or alice in c]
    for name in NAMESPACES:
        assert ns_of(bob_kernel_pid, name) != ns_of(kernel, name), name


def test_kernel_limit_holds_inside_the_job_and_the_jobs_limit_over_all(hub: SlurmHub) -> None:
    alice = USERS[0]
    first, second = hub.kernel(alice), hub.kernel(alice)
    uid = pwd.getpwnam(alice).pw_uid
    server = server_pid(uid)
    job_memcg = cgroup_of(server, "memory").split("/step_")[0]
    step_memcg = cgroup_of(server, "memory").rsplit("/task_")[0]  # Slurm limits both
    assert memcg(job_memcg, "memory.limit_in_bytes") == 900 << 20

    second_pid = host_pid(hub.run(alice, second, REPORT))  # type: ignore[arg-type]
    second_memcg = cgroup_of(second_pid, "memory")
    assert second_memcg.startswith(job_memcg + "/")
    assert memcg(second_memcg, "memory.limit_in_bytes") == KERNEL_MEMORY

    # over the kernel's own limit, well under the job's: the kernel's cgroup stops it.
    # (oom_score_adj: the allocation is the OOM killer's victim, never what else runs)
    allocate = ("import subprocess, sys; r = subprocess.run([sys.executable, '-c', "
                "'open(\\'/proc/self/oom_score_adj\\', \\'w\\').write(\\'1000\\'); "
                "b = bytes([1]) * ({mb} << 20); print(len(b))'], capture_output=True); "
                "print(r.returncode)")
    peak_reset(job_memcg, step_memcg, second_memcg)
    assert hub.run(alice, second, allocate.format(mb=800)) == -9
    assert reached_limit(second_memcg)
    assert not reached_limit(step_memcg) and not reached_limit(job_memcg)

    # each kernel under its own limit, together over the job's: the job's holds
    hub.run(alice, first, "import subprocess, sys; held = subprocess.Popen([sys.executable, "
            "'-c', 'import time; b = bytes([1]) * (300 << 20); print(1, flush=True); "
            "time.sleep(600)'], stdout=subprocess.PIPE); print(held.stdout.readline().decode())")
    peak_reset(job_memcg, step_memcg, second_memcg)
    assert hub.run(alice, second, allocate.format(mb=560)) == -9
    assert reached_limit(job_memcg) or reached_limit(step_memcg)
    assert not reached_limit(second_memcg)  # not the kernel's limit this time
    hub.run(alice, first, "held.kill(); held.wait(); print(1)")


def test_scancel_leaves_nothing_and_the_hub_starts_the_server_again(hub: SlurmHub) -> None:
    alice = USERS[0]
    hub.kernel(alice)
    uid = pwd.getpwnam(alice).pw_uid
    home = pwd.getpwnam(alice).pw_dir
    job = hub.job(alice)
    kernel_cgroups = [f"/sys/fs/cgroup/{c}{path}" for p in hub.job_pids(uid)
                      for c in ("memory", "freezer") if "/nsprov-" in (path := cgroup_of(p, c))]
    assert kernel_cgroups
    runtime = Path(home, ".local/share/jupyter/runtime")
    assert list(runtime.glob("kernel-*.json"))
    assert list(Path(f"/tmp/nsprov-{uid}").iterdir())  # the server's socket dirs

    hub.cluster.run("scancel", job)
    hub.cluster.wait_gone(job)
    assert {p: describe(p) for p in hub.job_pids(uid)} == {}
    assert [p for p in kernel_cgroups if os.path.exists(p)] == []
    assert not [str(p) for root in hub.cluster.cgroup_roots()
                for p in root.glob(f"uid_{uid}/**/nsprov-*")]
    assert list(runtime.glob("kernel-*.json")) == []
    assert list(Path(f"/tmp/nsprov-{uid}").iterdir()) == []

    deadline = time.monotonic() + 30  # the hub's poll (poll_interval) sees the job gone
    while hub.server_running(alice):
        assert time.monotonic() < deadline, "the hub did not notice the cancelled job"
        time.sleep(0.5)
    kernel = hub.kernel(alice)
    assert hub.job(alice) != job
    assert hub.run(alice, kernel, "print(6 * 7)") == 42
