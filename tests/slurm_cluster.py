"""A one-node Slurm cluster in a temp dir, from Debian's slurmctld, slurmd and munge.

Everything it uses is its own: a munge key and socket, a slurm.conf and a
cgroup.conf, state and spool directories, free ports. The daemons run in the
foreground as children of the caller, so stop() kills them by pid; nothing
of the packages' own services (if any started) is touched.

The plugins are the ones that work on a cgroup v1 host without systemd
(docs/scale-out.md says why): proctrack/cgroup (the freezer hierarchy tracks
every process of a job, also those that left its session) and task/cgroup
with ConstrainRAMSpace (the job's memory limit); cores and devices are not
constrained, which needs cpuset/devices setup this test does not check.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import stop_process

SBIN = ("/usr/sbin", "/usr/bin")
CPUS = 2
REAL_MEMORY_MB = 3072


def _tool(name: str) -> str:
    for d in SBIN:
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise FileNotFoundError(f"{name} is not installed: run scripts/slurm-deps.sh (as root), "
                            "which installs Debian's slurmctld, slurmd, slurm-client and munge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SlurmCluster:
    """slurmctld + slurmd + munged for one node named after this host."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.node = socket.gethostname().split(".")[0]
        self.conf = workdir / "slurm.conf"
        self.munge_socket = workdir / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- configuration ----

    def write_config(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(mode=0o755, exist_ok=True)
        # users' sbatch/squeue reach munged's socket and read slurm.conf
        os.chmod(d, 0o755)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(f"""\
ClusterName=nsprovtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmdDebug=verbose
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
KillWait=5
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={REAL_MEMORY_MB} State=UNKNOWN
PartitionName=nsprov Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (d / "cgroup.conf").write_text("""\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainCores=no
ConstrainDevices=no
""")

    # ---- daemons ----

    def _start(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / "log" / log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.write_config()
        d = self.dir
        self._start([_tool("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={d}/munge/munge.key", f"--pid-file={d}/munge/munged.pid",
                     f"--seed-file={d}/munge/munged.seed", f"--log-file={d}/log/munged.log"],
                    "munged.out")
        self._wait(lambda: self.munge_socket.exists(), "munged did not create its socket",
                   "munged.log")
        os.chmod(self.munge_socket, 0o777)
        self._start([_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(self._controller_answers, "slurmctld did not answer", "slurmctld.log")
        self._start([_tool("slurmd"), "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait(self._node_idle, "the node did not become idle", "slurmd.log")

    def _controller_answers(self) -> bool:
        return self.run("scontrol", "ping", check=False).returncode == 0 and \
            "UP" in self.run("scontrol", "ping", check=False).stdout

    def _node_idle(self) -> bool:
        state = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout
        return state.strip().rstrip("*") in ("idle", "mixed", "allocated")

    def _wait(self, ready: object, what: str, log: str, timeout: float = 30) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead}); {log}:\n{self.log(log)}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        try:
            return (self.dir / "log" / name).read_text(errors="replace")[-4000:]
        except OSError as e:
            return f"({e})"

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        path = shutil.which(argv[0], path="/usr/bin:/usr/sbin") or argv[0]
        return subprocess.run([path, *argv[1:]], capture_output=True, text=True, env=self.env,
                              check=check, timeout=30)

    def jobs(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i", check=False).stdout
        return out.split()

    def wait_gone(self, job: str, timeout: float = 60) -> None:
        """Until `job` has left squeue (its processes ended, its epilog done)."""
        deadline = time.monotonic() + timeout
        while job in self.jobs():
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} still in squeue after {timeout} s:\n"
                                   + self.log("slurmd.log"))
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, kill the daemons by pid (slurmd first: it owns the steps),
        and remove the cgroups Slurm made (slurm_<node> in each hierarchy)."""
        if all(p.poll() is None for p in self.procs[:2]):
            jobs = self.jobs()
            if jobs:
                self.run("scancel", *jobs, check=False)
                for job in jobs:
                    try:
                        self.wait_gone(job, 30)
                    except RuntimeError:
                        break
        for proc in reversed(self.procs):
            stop_process(proc, 15)
        self.procs.clear()
        for root in self.cgroup_roots():
            for path, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(path)
                except OSError:
                    pass  # kept: the test that made the cluster reports what is left

    def cgroup_roots(self) -> list[Path]:
        """Slurm's own cgroup in each v1 hierarchy: slurm_<node> (Debian builds Slurm
        with multiple-slurmd support), else slurm."""
        return [p for name in (f"slurm_{self.node}", "slurm")
                for p in Path("/sys/fs/cgroup").glob(f"*/{name}") if p.is_dir()]
