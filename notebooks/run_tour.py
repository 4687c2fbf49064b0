"""Run notebooks/tour.ipynb in the sandboxed kernel and print what it found.

    python notebooks/run_tour.py [--kernel python3-sandboxed] [--output tour.executed.ipynb]

Uses only nbclient and nbformat. After `pip install .` the kernelspec
python3-sandboxed is installed with the package; in a source checkout
(editable install, where pip installs no data files) the checkout's
share/jupyter is searched as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CHECKOUT_KERNELS = HERE.parent / "share" / "jupyter" / "kernels"


def kernelspec_manager(kernel: str) -> KernelSpecManager:
    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(kernel)
    except NoSuchKernel:
        ksm = KernelSpecManager(kernel_dirs=[*ksm.kernel_dirs, str(CHECKOUT_KERNELS)])
        ksm.get_kernel_spec(kernel)  # still missing: let NoSuchKernel tell the user
    return ksm


def run_tour(kernel: str, output: Path, timeout: int = 60) -> dict[str, object]:
    """Execute the tour, write it to `output`, return the summary its last cell printed."""
    nb = nbformat.read(HERE / "tour.ipynb", as_version=4)
    km = AsyncKernelManager(kernel_name=kernel, kernel_spec_manager=kernelspec_manager(kernel))
    client = NotebookClient(nb, km=km, timeout=timeout,
                            resources={"metadata": {"path": os.getcwd()}})
    # cleanup_kc: shut the kernel down at the end; NotebookClient does that only
    # for a kernel manager it made itself, and ours was passed in
    client.execute(cleanup_kc=True)
    nbformat.write(nb, output)
    last = nb.cells[-1].outputs[-1]
    summary: dict[str, object] = json.loads(last["text"])
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="python3-sandboxed")
    parser.add_argument("--output", type=Path, default=Path("tour.executed.ipynb"))
    args = parser.parse_args()
    begin = time.monotonic()
    summary = run_tour(args.kernel, args.output)
    elapsed = time.monotonic() - begin
    limits = summary["limits"]
    assert isinstance(limits, dict)
    print(f"tour: executed in kernel {args.kernel} in {elapsed:.1f} s -> {args.output}")
    print(f"  PID 1: {summary['pid1']}; kernel pid {summary['kernel_pid']} "
          f"in {summary['pid_namespace']}")
    print(f"  processes visible: pids {summary['visible_pids']}")
    print(f"  uid {summary['uid']}, uid_map {summary['uid_map']}, "
          f"effective capabilities {summary['capabilities']}")
    print(f"  host root writable: {summary['root_writable']}; "
          f"working directory writable: {summary['cwd_writable']}")
    print(f"  server secrets seen: {summary['secrets_seen'] or 'none'}; "
          f"hostname {summary['hostname']}")
    print("  limits: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
