"""The boundary as a real sandboxed ipykernel sees it (NamespaceProvisioner)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from .conftest import PROBE_HELPERS, execute_ok, run

pytestmark = pytest.mark.timeout(120)

PROBE = PROBE_HELPERS + """
_status = proc_status()
print(json.dumps({
    "status": {k: _status[k] for k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp")},
    "own": json.loads(read(OWN))["key"] != "",
    "other": err(read, OTHER),
    "list_runtime": err(os.listdir, os.path.dirname(OWN)),
    "usr": err(write, "/usr/nsx-probe"),
    "home": os.path.expanduser("~"),
    "ipython_dir": os.environ["IPYTHONDIR"],
    "history": os.path.exists(os.path.join(os.environ["IPYTHONDIR"],
                                           "profile_default/history.sqlite")),
}))
"""


def kernelspec(kernels: Path) -> None:
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sandboxed", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner"}},
    }
    (kernels / "sandboxed").mkdir(parents=True)
    (kernels / "sandboxed" / "kernel.json").write_text(json.dumps(spec))


def test_kernel_sees_only_its_own_connection_file(tmp_path: Path, no_leaks: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    home, runtime, work, kernels = (tmp_path / n for n in ("home", "runtime", "work", "kernels"))
    for d in (home, runtime, work):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    kernelspec(kernels)

    async def main() -> dict[str, Any]:
        managers = [AsyncKernelManager(
            kernel_name="sandboxed",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]),
            connection_file=str(runtime / f"kernel-{uuid.uuid4()}.json")) for _ in range(2)]
        clients = []
        try:
            for km in managers:
                await km.start_kernel(cwd=str(work))
                kc = km.client()
                kc.start_channels()
                clients.append(kc)
                await kc.wait_for_ready(timeout=30)
            own, other = (km.connection_file for km in managers)
            await execute_ok(clients[0], "1 + 1")  # a line of history
            out = await execute_ok(clients[0], f"OWN, OTHER = {own!r}, {other!r}\n" + PROBE)
            result: dict[str, Any] = json.loads(out)
            return result
        finally:
            for kc in clients:
                kc.stop_channels()
            for km in managers:
                if km.has_kernel:
                    await km.shutdown_kernel(now=True)

    r = run(main())
    assert r["status"] == {"CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1",
                           "Seccomp": "2"}
    assert r["own"] is True
    assert r["other"] in ("ENOENT", "EACCES")  # the other kernel's key stays outside
    assert r["list_runtime"] == "EACCES"
    assert r["usr"] == "EROFS"
    assert r["home"] == str(home) and r["history"] is True
    # IPython's history lives in the sandboxes' own state, not in ~/.ipython,
    # which the server's user's other IPython sessions read
    assert r["ipython_dir"].startswith(str(home / ".local/share/nsprovisioner/sandbox/"))
