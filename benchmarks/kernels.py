"""LocalProvisioner vs namespace-provisioner, measured in one run on this machine.

    python benchmarks/kernels.py [--repeat 5] [--concurrent 10 50] [--json F] [--plot F.png]

Start (start_kernel until the kernel answers kernel_info), interrupt latency
(SIGINT until a running `time.sleep` reports KeyboardInterrupt), clean
shutdown (shutdown_request until the process is reaped), and N kernels
started at once (time until all are ready, failures). Medians; ratios are
to local. "nonet" is the sandbox with network = "none" (ipc transport);
"wrapped" is the sandbox with the argv this package writes into kernelspecs
(the nsprovisioner.kernel_launcher prefix, which the provisioner strips).
Targets: start <= 1.02x (also for nonet and wrapped), shutdown <= 1.05x,
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

from nsprovisioner.kernel_launcher import wrap_argv

# kernelspec name -> (provisioner, its config)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "local": ("local", {}),
    "namespace": ("namespace", {}),
    "nonet": ("namespace", {"network": "none"}),
    "wrapped": ("namespace", {}),
}
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


async def main(repeat: int, concurrent: list[int], json_out: Path | None,
               plot_out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_kernelspecs(Path(tmp))
        ksm = KernelSpecManager(kernel_dirs=[tmp])
        samples: dict[str, dict[str, list[float]]] = {p: {} for p in PROVISIONERS}
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
    print_table(results, repeat)
    if json_out:
        json_out.write_text(json.dumps({"repeat": repeat, "results": results,
                                        "samples": samples}, indent=2))
    if plot_out:
        plot(results, plot_out)


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


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results if not k.endswith("failures")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
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
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.concurrent, args.json, args.plot))
