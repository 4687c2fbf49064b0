"""Memory of the machinery per sandbox: the init's proportional set size.

Starts N sandboxes running `sleep` from one process and reads each init's
Pss from /proc/<pid>/smaps_rollup: the pages it shares with the other inits
(the helper's text, from the one sealed memfd per server) count 1/N each, its
own pages fully. Run as root: the init is not dumpable, so only root may read
its memory maps.

    python benchmarks/memory.py [--sandboxes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from nsprovisioner import SandboxSpec, spawn


def rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


async def measure(n: int) -> list[dict[str, int]]:
    procs = [await spawn(SandboxSpec(), ["sleep", "60"]) for _ in range(n)]
    try:
        await asyncio.sleep(0.5)  # every init past its fork, its plan freed
        return [rollup(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            await p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=20)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.sandboxes))
    for key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Dirty", "Shared_Clean"):
        values = [r.get(key, 0) for r in rows]
        print(f"{key:<14} median {statistics.median(values):>6} kB   "
              f"min {min(values):>6} kB   max {max(values):>6} kB")
    pss = statistics.median(r["Pss"] for r in rows)
    print(f"target: init Pss <= 150 kB with {args.sandboxes} sandboxes: "
          f"{'met' if pss <= 150 else 'NOT met'} ({pss} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
