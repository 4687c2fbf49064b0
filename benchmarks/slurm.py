"""Sandboxed kernels inside a Slurm job against unsandboxed ones in the same job, same run.

    python benchmarks/slurm.py [--repeat 10]        (as root, Slurm from scripts/slurm-deps.sh)

Starts the one-node cluster of tests/slurm_cluster.py and a throw-away user,
and runs benchmarks/kernels.py's measurements as that user in one job step
(srun --mem=2G): "local" is LocalProvisioner, "namespace" the default sandbox,
"limited" the sandbox with memory_limit = 512M, whose cgroup nests inside the
job's. Interleaved, medians, ratios to local. For reference, the same user
first runs local and namespace outside any job. Everything it made is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

USER = "nsps-bench"
HERE = Path(__file__).resolve().parent


VARIANTS = {
    "local": ("local", {}),
    "namespace": ("namespace", {}),
    "limited": ("namespace", {"memory_limit": "512M"}),
}


def measure(repeat: int, in_job: bool) -> None:
    import kernels  # benchmarks/kernels.py, copied beside this file

    # outside a job the user has no writable cgroup: no "limited" there
    kernels.VARIANTS = {k: v for k, v in VARIANTS.items() if in_job or k != "limited"}
    kernels.PROVISIONERS = tuple(kernels.VARIANTS)
    kernels.WRAPPED = set()
    where = (f"in Slurm job {os.environ.get('SLURM_JOB_ID')}" if in_job else
             "as the same user, outside any job")
    print(f"== {where}; memory cgroup: "
          f"{[line for line in Path('/proc/self/cgroup').read_text().splitlines() if ':memory:' in line]}",
          flush=True)
    asyncio.run(kernels.main(repeat, [], None, None))


def run_in_cluster(repeat: int) -> int:
    sys.path.insert(0, str(HERE.parent))
    from tests.slurm_cluster import SlurmCluster

    work = Path(tempfile.mkdtemp(prefix="nsprov-slurm-bench-"))
    os.chmod(work, 0o755)
    (work / "slurm").mkdir()
    cluster = SlurmCluster(work / "slurm")
    try:
        subprocess.run(["useradd", "--create-home", USER], check=True, capture_output=True)
        for name in ("kernels.py", "slurm.py"):
            shutil.copy(HERE / name, work / name)
            os.chmod(work / name, 0o644)
        cluster.start()
        runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
        bench = [sys.executable, str(work / "slurm.py"), "--repeat", str(repeat)]
        outside = subprocess.run([runuser, "-u", USER, "--", *bench, "--outside-job"],
                                 env=cluster.env, cwd="/tmp", check=False)
        inside = subprocess.run(
            [runuser, "-u", USER, "--", "srun", "--mem=2G", "--cpus-per-task=2", "-p", "nsprov",
             *bench, "--inside-job"], env=cluster.env, cwd="/tmp", check=False)
        return outside.returncode or inside.returncode
    finally:
        cluster.stop()
        try:
            uid = pwd.getpwnam(USER).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            subprocess.run(["userdel", "-r", USER], check=False, capture_output=True)
            shutil.rmtree(f"/tmp/nsprov-{uid}", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--inside-job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--outside-job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside_job or args.outside_job:
        measure(args.repeat, args.inside_job)
    else:
        if os.geteuid() != 0:
            sys.exit("benchmarks/slurm.py starts Slurm's daemons and a test user: run it as root")
        sys.exit(run_in_cluster(args.repeat))
