"""LocalProvisioner vs namespace-provisioner, measured in one run on this machine.

    python benchmarks/kernels.py [--repeat 5] [--concurrent 10 50]

Start (start_kernel until the kernel answers kernel_info), interrupt latency
(SIGINT until a running `time.sleep` reports KeyboardInterrupt), clean
shutdown (shutdown_request until the process is reaped), and N kernels
started at once (time until all are ready, failures). Medians; ratios are
namespace / local. Targets: start <= 1.02x, shutdown <= 1.05x,
interrupt <= 1.1x, 50 concurrent with 0 failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

PROVISIONERS = ("local", "namespace")


def write_kernelspecs(kernels: Path) -> None:
    for name in PROVISIONERS:
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": name, "language": "python",
            "metadata": {"kernel_provisioner": {"provisioner_name": f"{name}-provisioner"}}}))


async def one_kernel(ksm: KernelSpecManager, name: str) -> dict[str, float]:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    begin = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        start = time.perf_counter() - begin
        kc.execute("import time; print('go', flush=True); time.sleep(30)")
        while True:
            msg = await kc.get_iopub_msg(timeout=10)
            if msg["msg_type"] == "stream":
                break
        begin = time.perf_counter()
        await km.interrupt_kernel()
        await kc.get_shell_msg(timeout=10)
        interrupt = time.perf_counter() - begin
    finally:
        kc.stop_channels()
    begin = time.perf_counter()
    await km.shutdown_kernel()
    shutdown = time.perf_counter() - begin
    return {"start": start, "interrupt": interrupt, "shutdown": shutdown}


async def many_kernels(ksm: KernelSpecManager, name: str, count: int) -> tuple[float, int]:
    mkm = AsyncMultiKernelManager(kernel_spec_manager=ksm)
    begin = time.perf_counter()

    async def start_one() -> None:
        kernel_id = await mkm.start_kernel(kernel_name=name)
        kc = mkm.get_kernel(kernel_id).client()
        kc.start_channels()
        try:
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
    return elapsed, failures


async def main(repeat: int, concurrent: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_kernelspecs(Path(tmp))
        ksm = KernelSpecManager(kernel_dirs=[tmp])
        samples: dict[str, dict[str, list[float]]] = {p: {} for p in PROVISIONERS}
        for _ in range(repeat):  # interleaved, so drift hits both alike
            for name in PROVISIONERS:
                for key, value in (await one_kernel(ksm, name)).items():
                    samples[name].setdefault(key, []).append(value)
        rows: list[tuple[str, str, str, str]] = []
        for key in ("start", "interrupt", "shutdown"):
            local, ns = (statistics.median(samples[p][key]) for p in PROVISIONERS)
            rows.append((f"{key} (median of {repeat})", f"{local * 1000:.0f} ms",
                         f"{ns * 1000:.0f} ms", f"{ns / local:.2f}x"))
        for count in concurrent:
            found: dict[str, Any] = {}
            for name in PROVISIONERS:
                found[name] = await many_kernels(ksm, name, count)
            (lt, lf), (nt, nf) = found["local"], found["namespace"]
            rows.append((f"{count} concurrent, all ready", f"{lt:.1f} s ({lf} failed)",
                         f"{nt:.1f} s ({nf} failed)", f"{nt / lt:.2f}x"))
    header = ("measure", "local", "namespace", "ratio")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrent", type=int, nargs="*", default=[10, 50])
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.concurrent))
