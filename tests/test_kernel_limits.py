"""Limits seen from Jupyter: a kernel killed by its memory limit is reported and restarted."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

from nsprovisioner import SandboxSpec

from .conftest import SLOWDOWN, require_limit, run

pytestmark = pytest.mark.timeout(120 * SLOWDOWN)
LIMIT = "96M"


@pytest.fixture
def memory_controller() -> None:
    """The memory controller must be usable here (CI delegates it to its test user)."""
    require_limit(SandboxSpec(memory_limit=LIMIT), "memory")


def test_oom_killed_kernel_is_reported_and_restarted(
        tmp_path: Path, memory_controller: None, caplog: pytest.LogCaptureFixture) -> None:
    kernels = tmp_path / "kernels"
    (kernels / "small").mkdir(parents=True)
    (kernels / "small" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "small", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner",
                                            "config": {"memory_limit": LIMIT}}}}))

    async def main() -> None:
        km = AsyncIOLoopKernelManager(
            kernel_name="small", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
            config=Config({"KernelRestarter": {"time_to_dead": 0.2}}))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        restarted = asyncio.Event()
        try:
            await kc.wait_for_ready(timeout=30 * SLOWDOWN)
            km.add_restart_callback(restarted.set, "restart")
            kc.execute("hog = b'x' * (512 * 2**20)")  # touches every page: the OOM killer
            await asyncio.wait_for(restarted.wait(), 30 * SLOWDOWN)
            await kc.wait_for_ready(timeout=30 * SLOWDOWN)
            reply = await kc.execute_interactive("print('back')", timeout=30 * SLOWDOWN)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    with caplog.at_level(logging.WARNING):
        run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("was killed: out of memory (limit 96 MiB)" in m for m in messages), messages
