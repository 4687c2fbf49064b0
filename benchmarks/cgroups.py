"""What a sandbox's cgroup costs: spawn() of /bin/true without a cgroup, with
the cleanup-only cgroup (no limits), and with memory, pids and cpu limits;
plus create_cgroup() + kill_and_remove() on their own.

The variants run interleaved round by round in one process, so a busy
machine slows them alike; the report is medians in ms and the difference to
the spawn without a cgroup.

    python benchmarks/cgroups.py [--rounds 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import time
from collections.abc import Callable

from nsprovisioner import SandboxError, SandboxSpec, spawn
from nsprovisioner.cgroups import create_cgroup

spawn_module = importlib.import_module("nsprovisioner.spawn")
NO_LIMITS = SandboxSpec()
LIMITS = SandboxSpec(memory_limit="256M", pids_limit=64, cpu_limit=1.0)


async def sandbox_true(spec: SandboxSpec, with_cgroup: bool) -> None:
    real = getattr(spawn_module, "create_cgroup")  # noqa: B009 (spawn() shadows the module)
    if not with_cgroup:
        setattr(spawn_module, "create_cgroup", lambda spec, name: None)  # noqa: B010
    try:
        proc = await spawn(spec, ["/bin/true"])
    finally:
        setattr(spawn_module, "create_cgroup", real)  # noqa: B010
    if await proc.wait() != 0:
        raise RuntimeError("sandboxed /bin/true failed")


def cgroup_only(spec: SandboxSpec) -> None:
    cgroup = create_cgroup(spec, None)
    if cgroup is not None:
        cgroup.kill_and_remove()


def variants() -> dict[str, Callable[[], None]]:
    found: dict[str, Callable[[], None]] = {
        "spawn, no cgroup": lambda: asyncio.run(sandbox_true(NO_LIMITS, False)),
        "spawn, cgroup without limits": lambda: asyncio.run(sandbox_true(NO_LIMITS, True)),
        "create+remove, without limits": lambda: cgroup_only(NO_LIMITS),
    }
    try:
        cgroup_only(LIMITS)
        found["spawn, cgroup with limits"] = lambda: asyncio.run(sandbox_true(LIMITS, True))
        found["create+remove, with limits"] = lambda: cgroup_only(LIMITS)
    except SandboxError as e:
        print(f"limits skipped: {e}")
    return found


def measure(rounds: int) -> dict[str, list[float]]:
    runs = variants()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm up: imports, page cache, first cgroup dirs
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--json", metavar="FILE", help="write the raw times (ms) here")
    args = parser.parse_args()
    times = measure(args.rounds)
    base = statistics.median(times["spawn, no cgroup"])
    print(f"{'variant':32} {'median ms':>10} {'p90 ms':>8} {'vs no cgroup':>13}")
    for name, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        delta = f"{median - base:+.2f} ms" if name.startswith("spawn") else ""
        print(f"{name:32} {median:10.2f} {p90:8.2f} {delta:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(times, f, indent=1)


if __name__ == "__main__":
    main()
