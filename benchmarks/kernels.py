"""LocalProvisioner vs namespace-provisioner, measured in one run on this machine.

    python benchmarks/kernels.py [--repeat 5] [--concurrent 10 50] [--json F] [--plot F.png]
                                 [--download]

Start (start_kernel() until the kernel's first kernel_info reply), interrupt latency
(SIGINT until a running `time.sleep` reports KeyboardInterrupt), clean
shutdown (shutdown_request until the process is reaped), and N kernels
started at once (time until all are ready, failures). Medians; ratios are
to local. "nonet" is the sandbox with network = "none" (ipc transport);
"wrapped" is the sandbox with the argv this package writes into kernelspecs
(the nsprovisioner.kernel_launcher prefix, which the provisioner strips);
"egress" the sandbox with network = "egress" (pasta beside it); "pooled" the
sandbox with pool_size = 2 (pool.py), each start taken from a filled pool.
Targets: start <= 1.02x (also for nonet and wrapped; egress <= 1.05x),
shutdown <= 1.05x, interrupt <= 1.1x, 50 concurrent with 0 failures;
pooled start <= 50 ms and <= 0.1x; in a burst of N with pool_size = 2, the
N - 2 starts that miss the pool no slower than the unpooled sandbox's
("median start" rows: each start's own start->ready, the misses' for pooled).
--download (root): a 100 MB HTTP download from a test "internet" namespace
(a veth pair, 198.51.100.0/24) through egress against the same download from
the host, as a throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from nsprovisioner.kernel_launcher import wrap_argv

# kernelspec name -> (provisioner, its config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "local": ("local", {}),
    "namespace": ("namespace", {}),
    "nonet": ("namespace", {"network": "none"}),
    "wrapped": ("namespace", {}),
    "egress": ("namespace", {"network": "egress"}),
    "pooled": ("namespace", {"pool_size": 2}),
}
POOLED = "pooled"
PROVISIONERS = tuple(VARIANTS)
# kernelspecs whose argv has the launcher prefix, as shipped and installed
WRAPPED = {"wrapped"}


def write_kernelspecs(kernels: Path) -> None:
    for name, (provisioner, config) in VARIANTS.items():
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        if name in WRAPPED:
            argv = wrap_argv(argv, name, sys.executable)
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps({
            "argv": argv,
            "display_name": name, "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": f"{provisioner}-provisioner",
                                                "config": config}}}))


def manager(ksm: KernelSpecManager, name: str) -> AsyncKernelManager:
    """A kernel manager whose connection file is in Jupyter's runtime dir, as a server's
    (a bare AsyncKernelManager writes it to /tmp, where no pooled sandbox can show it)."""
    runtime = jupyter_runtime_dir()
    os.makedirs(runtime, exist_ok=True)
    return AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm,
                              connection_file=os.path.join(runtime, f"kernel-{uuid.uuid4()}.json"))


async def pool_ready(count: int, name: str) -> None:
    """Wait until the pooled kernelspec's pool has `count` kernels done importing: before
    a pooled start, and before any other once the pool exists (its refill would compete)."""
    from nsprovisioner import pool

    if name != POOLED and not pool._pools:
        return
    deadline = time.monotonic() + 120
    while sum(k.ready for p in pool._pools.values() for k in p.waiting) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not fill in 120 s")
        await asyncio.sleep(0.05)


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its descendants, in bytes."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("Pss:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return total


async def pool_memory(ksm: KernelSpecManager) -> dict[str, float]:
    """MiB of PSS: a waiting pooled kernel's sandbox, and the same once it is a kernel."""
    from nsprovisioner import pool

    await pool_ready(2, POOLED)
    waiting = [k.proc.pid for p in pool._pools.values() for k in p.waiting]
    before = statistics.median(tree_pss(pid) for pid in waiting) / 2**20
    km = manager(ksm, POOLED)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        after = tree_pss(km.provisioner.sandbox.pid) / 2**20
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return {"waiting": before, "started": after}


async def first_kernel_info(kc: Any) -> None:
    """The kernel's first kernel_info reply (wait_for_ready adds >= 0.2 s of iopub flush)."""
    kc.kernel_info()
    while (await kc.get_shell_msg(timeout=60))["msg_type"] != "kernel_info_reply":
        pass


async def printed_go(kc: Any, msg_id: str, name: str) -> bool:
    """Whether the next iopub message is the cell's own "go" on stdout: the cell runs,
    and a SIGINT interrupts it. Any other stream message (the kernel may write to stderr
    before the cell runs) is shown, not taken for it: a SIGINT that lands in ipykernel's
    own code before the cell runs is swallowed there, and no execute_reply comes."""
    msg = await kc.get_iopub_msg(timeout=10)
    if msg["msg_type"] != "stream":
        return False
    content, parent = msg["content"], msg["parent_header"]
    if parent.get("msg_id") == msg_id and content["name"] == "stdout" and "go" in content["text"]:
        return True
    print(f"{name}: before the cell's output, on {content['name']}: {content['text']!r}",
          file=sys.stderr)
    return False


async def one_kernel(ksm: KernelSpecManager, name: str) -> dict[str, float]:
    await pool_ready(2, name)
    km = manager(ksm, name)
    begin = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await first_kernel_info(kc)
        start = time.perf_counter() - begin
        if name == POOLED and not km.provisioner.pooled:
            raise RuntimeError("a pooled start missed its filled pool")
        await kc.wait_for_ready(timeout=60)
        # the pool's refill after a hand-out takes a core for a kernel's start: the
        # interrupt of a pooled kernel is measured once it is done, as the others'
        await pool_ready(2, name)
        # short sleeps: a process-directed SIGINT may be taken by another of the kernel's
        # threads, and CPython raises KeyboardInterrupt in the main thread only once its
        # blocking call returns (1 in 60 LocalProvisioner interrupts here: after the
        # whole sleep(30)); local and sandboxed kernels alike
        msg_id = kc.execute("import time\nprint('go', flush=True)\n"
                            "for _ in range(300): time.sleep(0.1)")
        while not await printed_go(kc, msg_id, name):
            pass
        begin = time.perf_counter()
        await km.interrupt_kernel()
        try:
            await kc.get_shell_msg(timeout=10)
        except Empty:
            raise RuntimeError(f"{name}: an interrupt got no reply in 10 s") from None
        interrupt = time.perf_counter() - begin
    finally:
        kc.stop_channels()
    begin = time.perf_counter()
    await km.shutdown_kernel()
    shutdown = time.perf_counter() - begin
    return {"start": start, "interrupt": interrupt, "shutdown": shutdown}


async def many_kernels(ksm: KernelSpecManager, name: str,
                       count: int) -> tuple[float, int, float]:
    """(time until all are ready, failures, median start of those that missed the pool)"""
    await pool_ready(2, name)
    # the connection files in Jupyter's runtime dir, as a server has them
    mkm = AsyncMultiKernelManager(kernel_spec_manager=ksm, connection_dir=jupyter_runtime_dir())
    begin = time.perf_counter()
    missed: list[float] = []

    async def start_one() -> None:
        began = time.perf_counter()
        kernel_id = await mkm.start_kernel(kernel_name=name)
        km = mkm.get_kernel(kernel_id)
        kc = km.client()
        kc.start_channels()
        try:
            await first_kernel_info(kc)
            if not getattr(km.provisioner, "pooled", False):
                missed.append(time.perf_counter() - began)
            await kc.wait_for_ready(timeout=120)
        finally:
            kc.stop_channels()

    results = await asyncio.gather(*(start_one() for _ in range(count)),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - begin
    failures = sum(isinstance(r, BaseException) for r in results)
    for r in results:
        if isinstance(r, BaseException):
            print(f"  {name}: {type(r).__name__}: {r}", file=sys.stderr)
    await mkm.shutdown_all(now=True)
    mkm.context.destroy()
    return elapsed, failures, statistics.median(missed) if missed else float("nan")


DOWNLOAD = r"""
import sys, time, urllib.request
begin = time.perf_counter()
with urllib.request.urlopen(sys.argv[1], timeout=60) as r:
    size = 0
    while chunk := r.read(1 << 20):
        size += len(chunk)
print(size, time.perf_counter() - begin)
"""
DOWNLOAD_SIZE = 100 * 10**6


def download_ratio(repeat: int) -> dict[str, float]:
    """MB/s of a 100 MB download from the test's internet host, from the host and
    through egress; medians of `repeat`."""
    import subprocess

    from nsprovisioner import SandboxSpec
    from nsprovisioner.spawn import PIPE, spawn

    name, veth = f"nsp-bench-{os.getpid()}", f"nspb{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    async def through_egress(url: str) -> float:
        proc = await spawn(SandboxSpec(network="egress"), [sys.executable, "-c", DOWNLOAD, url],
                           stdout=PIPE)
        assert proc.stdout is not None
        out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
        await proc.wait()
        proc.close_pipes()
        return float(out.split()[1])

    with tempfile.TemporaryDirectory() as www:
        with open(os.path.join(www, "big.bin"), "wb") as f:
            f.write(os.urandom(10**6) * (DOWNLOAD_SIZE // 10**6))
        ip("netns", "add", name)
        server = None
        try:
            ip("link", "add", veth, "type", "veth", "peer", "name", "inet0", "netns", name)
            ip("addr", "add", "198.51.100.1/24", "dev", veth)
            ip("link", "set", veth, "up")
            ip("-n", name, "addr", "add", "198.51.100.2/24", "dev", "inet0")
            ip("-n", name, "link", "set", "inet0", "up")
            server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-m",
                                       "http.server", "--bind", "198.51.100.2", "--directory",
                                       www, "8080"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(1)
            url = "http://198.51.100.2:8080/big.bin"
            host, egress = [], []
            for _ in range(repeat):
                out = subprocess.run([sys.executable, "-c", DOWNLOAD, url], check=True,
                                     capture_output=True, text=True).stdout
                host.append(DOWNLOAD_SIZE / float(out.split()[1]) / 1e6)
                egress.append(DOWNLOAD_SIZE / asyncio.run(through_egress(url)) / 1e6)
        finally:
            if server is not None:
                server.kill()
                server.wait()
            subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return {"host MB/s": statistics.median(host), "egress MB/s": statistics.median(egress),
            "egress/host": statistics.median(egress) / statistics.median(host)}


async def main(repeat: int, concurrent: list[int], json_out: Path | None,
               plot_out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_kernelspecs(Path(tmp))
        ksm = KernelSpecManager(kernel_dirs=[tmp])
        samples: dict[str, dict[str, list[float]]] = {p: {} for p in PROVISIONERS}
        # the pool is made by a first start (which misses it), as in a server
        km = manager(ksm, POOLED)
        await km.start_kernel()
        await km.shutdown_kernel(now=True)
        for _ in range(repeat):  # interleaved, so drift hits all alike
            for name in PROVISIONERS:
                for key, value in (await one_kernel(ksm, name)).items():
                    samples[name].setdefault(key, []).append(value)
        results: dict[str, dict[str, Any]] = {}
        for key in ("start", "interrupt", "shutdown"):
            results[key] = {p: statistics.median(samples[p][key]) for p in PROVISIONERS}
        for count in concurrent:
            found = {name: await many_kernels(ksm, name, count) for name in PROVISIONERS}
            results[f"{count} concurrent"] = {p: found[p][0] for p in PROVISIONERS}
            results[f"{count} concurrent failures"] = {p: found[p][1] for p in PROVISIONERS}
            results[f"{count} concurrent, median start"] = {p: found[p][2] for p in PROVISIONERS}
        memory = await pool_memory(ksm)
        from nsprovisioner.pool import close_pools
        await close_pools()
    print(f"PSS of a pooled kernel's sandbox while it waits: {memory['waiting']:.0f} MiB; "
          f"once started: {memory['started']:.0f} MiB")
    print_table(results, repeat)
    if json_out:
        json_out.write_text(json.dumps({"repeat": repeat, "results": results,
                                        "samples": samples, "pool_pss_mib": memory}, indent=2))
    if plot_out:
        plot(results, samples, plot_out)


def print_table(results: dict[str, dict[str, Any]], repeat: int) -> None:
    header = ("measure", *PROVISIONERS, *(f"{p}/local" for p in PROVISIONERS[1:]))
    rows = []
    for key, values in results.items():
        if key.endswith("failures"):
            rows.append((key, *(str(values[p]) for p in PROVISIONERS),
                         *("",) * (len(PROVISIONERS) - 1)))
            continue
        unit = "s" if "concurrent" in key else "ms"
        scale = 1 if unit == "s" else 1000
        label = key if "concurrent" in key else f"{key} (median of {repeat})"
        rows.append((label, *(f"{values[p] * scale:.{1 if unit == 's' else 0}f} {unit}"
                              for p in PROVISIONERS),
                     *(f"{values[p] / values['local']:.2f}x" for p in PROVISIONERS[1:])))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def plot(results: dict[str, dict[str, Any]], samples: dict[str, dict[str, list[float]]],
         path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results if not k.endswith("failures")]
    fig, (ax, starts) = plt.subplots(1, 2, figsize=(12, 3.8),
                                     gridspec_kw={"width_ratios": [3, 2]})
    starts.boxplot([[t * 1000 for t in samples[p]["start"]] for p in PROVISIONERS],
                   tick_labels=list(PROVISIONERS))
    starts.set_yscale("log")
    starts.axhline(50, color="green", linewidth=0.8, linestyle="--")
    starts.set_ylabel("start -> first kernel_info reply (ms)")
    starts.set_title("Each start (green: 50 ms)")
    starts.tick_params(axis="x", rotation=15)
    sandboxed = PROVISIONERS[1:]
    width = 0.8 / len(sandboxed)
    for i, name in enumerate(sandboxed):
        ratios = [results[k][name] / results[k]["local"] for k in keys]
        offset = (i - (len(sandboxed) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(keys))], ratios, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=15)
    ax.set_ylabel("time / LocalProvisioner's")
    ax.set_title("Sandboxed kernels against LocalProvisioner (same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrent", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the ratios (needs matplotlib)")
    parser.add_argument("--download", action="store_true",
                        help="only the egress download throughput (root: builds a test network)")
    args = parser.parse_args()
    if args.download:
        for key, value in download_ratio(args.repeat).items():
            print(f"{key}: {value:.2f}")
    else:
        asyncio.run(main(args.repeat, args.concurrent, args.json, args.plot))
