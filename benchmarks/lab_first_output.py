"""A new notebook in JupyterLab until its first cell's output: pooled vs LocalProvisioner.

    python benchmarks/lab_first_output.py [--repeat 9] [--json F] [--plot F.png]

A real JupyterLab (as pip installed it, with nsprovisioner's extensions) in
Debian's headless Chromium, three kernelspecs: "local" (LocalProvisioner),
"sandbox" (namespace-provisioner) and "pooled" (namespace-provisioner with
pool_size = 2). Each round opens a new notebook on each, in a rotating order,
the way the launcher's button does (`notebook:create-new` with the kernel's
name), puts `print(...)` in its first cell, runs it once the toolbar has the
kernel, and times in the page from the command until the output is in the
page ("first output"); on the way, until the notebook is open and until the
session had its kernel (the server's POST /api/sessions returned); then the
cell run again in that kernel ("again": JupyterLab's own round trip, which
no kernel start is in). And, apart from the browser, the time the server
alone takes to answer POST /api/sessions for a new kernel of each
kernelspec ("server", from Python, after the browser's round). Then the notebook's kernel is shut
down and its tab closed. Before each measurement the machine is let go
quiet (a pool's refill would compete for the cores), and for "pooled" the
pool is full; the server's log tells whether the kernel came from the pool,
and a pooled start that missed it is reported, not counted. One warm-up
round first (it also makes the pool: a pool exists from its kernelspec's
first start). Medians, and ratios to local.

tests/lab_server.py (shared with tests/test_lab_browser.py) starts the server
and the browser; needs chromium and chromium-driver (scripts/setup-host.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from nsprovisioner.pool import waiting_on_host

# the tests' helpers, after the installed nsprovisioner (not the source tree's)
sys.path.append(str(Path(__file__).resolve().parent.parent))
from tests.lab_server import (
    TOKEN,
    chromium,
    kernelspec,
    new_notebook_output,
    open_lab,
    running_lab,
)

POOL_SIZE = 2
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "local": ("local-provisioner", {}),
    "sandbox": ("namespace-provisioner", {}),
    "pooled": ("namespace-provisioner", {"pool_size": POOL_SIZE}),
}
IDLE = 0.85  # of all cores, over QUIET_WINDOW
QUIET_WINDOW = 0.5


def idle_fraction(window: float) -> float:
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def settle(pool: int) -> bool:
    """Wait until `pool` kernels wait in the pool and the machine is quiet (a waiting
    kernel still importing keeps a core busy); False after 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(waiting_on_host().values()) >= pool and idle_fraction(QUIET_WINDOW) >= IDLE:
            return True
    return False


def api(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"{url}{path}?token={TOKEN}", method=method, headers={"Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


def server_session(url: str, kernel: str) -> float:
    """ms for the server alone to answer POST /api/sessions on a new kernel (what
    JupyterLab waits for in "session"); the session and its kernel are deleted."""
    start = time.perf_counter()
    session = api(url, "POST", "/api/sessions", {
        "path": f"api-{uuid.uuid4().hex}.ipynb", "type": "notebook", "name": "",
        "kernel": {"name": kernel}})
    elapsed = (time.perf_counter() - start) * 1000
    api(url, "DELETE", f"/api/sessions/{session['id']}")
    return elapsed


def measure(repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {name: {"open": [], "session": [], "output": [],
                                      "again": [], "server": [], "missed": 0}
                               for name in VARIANTS}
    loud = 0
    with tempfile.TemporaryDirectory(prefix="nsprov-lab-bench-") as tmp:
        base = Path(tmp)
        for name, (provisioner, config) in VARIANTS.items():
            kernelspec(base / "share", name, sys.executable, config, provisioner)
        (base / "root").mkdir()
        with running_lab(base) as (url, log), chromium(base / "chromium") as driver:
            open_lab(driver, url)
            names = list(VARIANTS)
            for round_ in range(repeat + 1):  # round 0: warm-up
                for name in names[round_ % 3:] + names[:round_ % 3]:
                    pool = POOL_SIZE if name == "pooled" and round_ > 0 else 0
                    if not settle(pool):
                        loud += 1
                    before = log.read_text().count("came from the pool")
                    marker = uuid.uuid4().hex
                    result = new_notebook_output(driver, name, f"print({marker!r})", marker)
                    if round_ == 0:
                        continue
                    pooled = log.read_text().count("came from the pool") > before
                    if name == "pooled" and not pooled:
                        results[name]["missed"] += 1
                        continue
                    for key in ("open", "session", "output", "again"):
                        results[name][key].append(result[key])
                    if not settle(pool):
                        loud += 1
                    before = log.read_text().count("came from the pool")
                    result["server"] = server_session(url, name)
                    if name != "pooled" or log.read_text().count("came from the pool") > before:
                        results[name]["server"].append(result["server"])
                    print(f"round {round_} {name:8} " + ", ".join(
                        f"{key} {result[key]:4.0f} ms" for key in ("open", "session", "output",
                                                                    "again", "server")),
                        flush=True)
    results["not_quiet"] = loud
    return results


def report(results: dict[str, Any]) -> None:
    local = statistics.median(results["local"]["output"])
    print("\n| measure | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for key, label in (("open", "notebook open"), ("session", "session has its kernel"),
                       ("output", "first cell's output"),
                       ("again", "the cell run again (run → output)"),
                       ("server", "the server alone: POST /api/sessions")):
        cells = []
        for name in VARIANTS:
            values = results[name][key]
            med = statistics.median(values)
            ratio = f" ({statistics.median(values) / local:.2f}x)" if key == "output" else ""
            cells.append(f"{med:.0f} ms{ratio} [{min(values):.0f}–{max(values):.0f}]")
        print(f"| {label} (median [min–max] of {len(results['local'][key])}) | "
              + " | ".join(cells) + " |")
    print(f"\npooled starts that missed the pool: {results['pooled']['missed']}; "
          f"measurements the machine was not quiet for: {results['not_quiet']}")


def plot(results: dict[str, Any], path: Path) -> None:
    """Every start's phases, as the page saw them: open, session, first output."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for row, name in enumerate(VARIANTS):
        r = results[name]
        for key, colour in (("output", "tab:blue"), ("session", "tab:orange"),
                            ("open", "tab:gray")):
            ax.scatter(r[key], [row + 0.12 * (i % 3 - 1) for i in range(len(r[key]))],
                       s=14, color=colour, label=key if row == 0 else None)
        ax.plot([statistics.median(r["output"])] * 2, [row - 0.3, row + 0.3], color="black")
    ax.set_yticks(range(len(VARIANTS)), list(VARIANTS))
    ax.set_xlabel("ms from the launcher's command (line: median first output)")
    ax.set_title("A new notebook in JupyterLab: notebook open, session has its kernel, "
                 "first output", fontsize=10)
    ax.legend(["first output", "session", "open"], loc="upper right", fontsize=8)
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="write a PNG of every start (needs matplotlib)")
    args = parser.parse_args()
    results = measure(args.repeat)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
