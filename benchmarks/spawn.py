"""Startup cost of a sandbox: spawn() of /bin/true against plain and other tools.

All variants run in the same process, interleaved round by round, so that a
busy machine slows every variant alike; the report is medians and ratios to
plain `asyncio.create_subprocess_exec('/bin/true')` measured in this run.

    python benchmarks/spawn.py [--rounds 200] [--extra-rss MIB] [--json out.json]
                               [--plot out.png]

--extra-rss makes this process hold that many MiB of touched memory first,
as a busy Jupyter server does: the start must not grow with the server.
--rss-series 0 100 400 measures only spawn(SandboxSpec()), round by round at
each of those amounts of extra resident memory (the memory is re-made before
each start, untimed), and reports how far the medians spread.

The issue's comparison is against the two fixed command lines UNSHARE and
BWRAP, which make namespaces and (bwrap) a fresh /proc, but no filesystem
boundary. The default SandboxSpec also builds issue 4's boundary, so one more
row, "bwrap-same-boundary", has bwrap build the same one (read-only root, new
/dev and /proc, private /tmp, /var/tmp, /run and /dev/shm, the binds of our
own mount plan, hostname, no capabilities, our seccomp filter, dies with its
parent): the like-for-like figure. unshare(1) comes from util-linux; bwrap from Debian's `bubblewrap` (a
variant whose tool is missing is reported as skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nsprovisioner import SandboxError, SandboxSpec, spawn
from nsprovisioner.mounts import NEWROOT, OLDROOT, plan_mounts
from nsprovisioner.seccomp import build_filter

MNT_BIND = 8  # NSX_MNT_BIND

UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--ipc",
           "--uts", "--cgroup", "true"]
BWRAP = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
         "--unshare-cgroup", "--dev-bind", "/", "/", "--proc", "/proc", "true"]


def bwrap_same_boundary(seccomp_fd: int) -> list[str]:
    """bwrap building the boundary SandboxSpec() builds, as far as bwrap can.

    The binds come from our own mount plan (home and cwd writable, the
    protected dotfiles, Jupyter and Python dirs read-only inside them, the
    state dir), so the two build the same tree; bwrap has no equivalent of
    the /proc/sys/user counters and RLIMIT_NPROC, which it skips.
    """
    binds = []
    for m in plan_mounts(SandboxSpec(), os.getcwd(), argv0="/bin/true"):
        if m.op == MNT_BIND and m.source and m.target.startswith(NEWROOT + "/"):
            flag = "--ro-bind" if m.mountflags & 0x1 else "--bind"  # MOUNT_ATTR_RDONLY
            binds += [flag, m.source.removeprefix(OLDROOT), m.target.removeprefix(NEWROOT)]
    return ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/run", *binds,
            "--tmpfs", "/dev/shm", "--hostname", "sandbox", "--cap-drop", "ALL",
            "--new-session", "--die-with-parent", "--seccomp", str(seccomp_fd), "true"]


LEAST = SandboxSpec(seccomp="off", readonly_root=False, private_tmp=False, hostname=None,
                    readwrite_paths=[])


async def run_exec(argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, pass_fds=pass_fds)
    if await proc.wait() != 0:
        raise RuntimeError(f"{argv[0]} failed")


async def run_bwrap_with_filter(filter_bytes: bytes) -> None:
    """bwrap reads the filter from an fd once per run: a fresh pipe each time."""
    r, w = os.pipe()
    try:
        os.write(w, filter_bytes)
        os.close(w)
        w = -1
        await run_exec(bwrap_same_boundary(r), pass_fds=(r,))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def run_sandbox(spec: SandboxSpec) -> None:
    proc = await spawn(spec, ["/bin/true"])
    if await proc.wait() != 0:
        raise RuntimeError("sandboxed /bin/true failed")


def variants() -> dict[str, Callable[[], Awaitable[None]] | str]:
    """name -> coroutine factory, or the reason the variant is skipped."""
    found: dict[str, Callable[[], Awaitable[None]] | str] = {
        "plain": lambda: run_exec(["/bin/true"]),
        "nsprovisioner": lambda: run_sandbox(SandboxSpec()),
        # the least the spec allows: still new /dev and /proc, pivot_root, init
        "nsprovisioner-least": lambda: run_sandbox(LEAST),
    }
    try:
        limited = SandboxSpec(memory_limit="256M", pids_limit=64, cpu_limit=1.0)
        asyncio.run(run_sandbox(limited))
        found["nsprovisioner+limits"] = lambda: run_sandbox(limited)
    except SandboxError as e:
        found["nsprovisioner+limits"] = f"skipped: {e}"
    for name, argv in (("unshare", UNSHARE), ("bwrap", BWRAP)):
        found[name] = ((lambda argv=argv: run_exec(argv)) if shutil.which(argv[0])
                       else f"skipped: {argv[0]} is not installed")
    filter_bytes = build_filter("default", strict=False)
    if not shutil.which("bwrap") or filter_bytes is None:
        found["bwrap-same-boundary"] = "skipped: needs bwrap and libseccomp"
    else:
        found["bwrap-same-boundary"] = lambda: run_bwrap_with_filter(filter_bytes)
    return found


async def measure(runs: dict[str, Callable[[], Awaitable[None]]],
                  rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: page cache, the init's memfd
        await run()
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            await run()
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], skipped: dict[str, str]) -> dict[str, object]:
    base = statistics.median(times["plain"])
    rows: dict[str, object] = {}
    print(f"{'variant':<22}{'median ms':>11}{'p90 ms':>9}{'x plain':>9}{'overhead ms':>13}")
    for name, samples in times.items():
        med = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        rows[name] = {"median_s": med, "p90_s": p90, "ratio": med / base,
                      "overhead_s": med - base}
        print(f"{name:<22}{med * 1e3:>11.2f}{p90 * 1e3:>9.2f}{med / base:>9.2f}"
              f"{(med - base) * 1e3:>13.2f}")
    for name, why in skipped.items():
        print(f"{name:<22}{why}")
        rows[name] = {"skipped": why}
    ours = times["nsprovisioner"]
    overhead = statistics.median(ours) - base
    for tool, limit in (("unshare", 1.0), ("bwrap", 0.5), ("bwrap-same-boundary", 0.8)):
        if tool in times:
            theirs = statistics.median(times[tool]) - base
            verdict = "met" if overhead <= limit * theirs else "NOT met"
            print(f"target: overhead <= {limit:g} x {tool}'s ({overhead * 1e3:.2f} ms vs "
                  f"{theirs * 1e3:.2f} ms, {overhead / theirs:.2f}x): {verdict}")
    return rows


def touched(mib: int) -> bytearray:
    ballast = bytearray(mib << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # resident, not just reserved
    return ballast


async def measure_rss_series(levels: list[int], rounds: int) -> dict[int, list[float]]:
    times: dict[int, list[float]] = {mib: [] for mib in levels}
    spec = SandboxSpec()
    await run_sandbox(spec)
    for _ in range(rounds):
        for mib in levels:
            ballast = touched(mib)
            t0 = time.perf_counter()
            await run_sandbox(spec)
            times[mib].append(time.perf_counter() - t0)
            del ballast
    return times


def report_rss_series(times: dict[int, list[float]]) -> None:
    medians = {mib: statistics.median(samples) for mib, samples in times.items()}
    for mib, med in medians.items():
        print(f"extra RSS {mib:>5} MiB: spawn + exit median {med * 1e3:.2f} ms")
    spread = max(medians.values()) / min(medians.values()) - 1
    print(f"target: within 10% of each other: {'met' if spread <= 0.10 else 'NOT met'} "
          f"(spread {spread * 100:.1f}%)")


def plot(times: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.boxplot([[t * 1e3 for t in times[n]] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right")
    ax.set_ylabel("start to exit of /bin/true (ms)")
    ax.set_title("Sandbox startup cost (same run, interleaved)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--extra-rss", type=int, default=0, metavar="MIB",
                        help="hold this much touched memory while measuring")
    parser.add_argument("--rss-series", type=int, nargs="+", metavar="MIB",
                        help="measure spawn at these amounts of extra resident memory")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="write a PNG box plot here (needs matplotlib)")
    args = parser.parse_args()
    if args.rss_series:
        report_rss_series(asyncio.run(measure_rss_series(args.rss_series, args.rounds)))
        return 0
    ballast = touched(args.extra_rss)
    found = variants()
    runs = {n: v for n, v in found.items() if not isinstance(v, str)}
    skipped = {n: v for n, v in found.items() if isinstance(v, str)}
    times = asyncio.run(measure(runs, args.rounds))
    rows = report(times, skipped)
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "extra_rss_mib": args.extra_rss,
                                         "variants": rows}, indent=2))
    if args.plot:
        plot(times, args.plot)
    del ballast
    return 0


if __name__ == "__main__":
    sys.exit(main())
