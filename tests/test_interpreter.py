"""The command's interpreter inside what the sandbox replaces or hides (interpreter.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from nsprovisioner import PIPE, SandboxError, SandboxSpec, spawn

from .conftest import SLOWDOWN, run


def output_of(spec: SandboxSpec, argv: list[str]) -> tuple[int, bytes]:
    async def main() -> tuple[int, bytes]:
        proc = await spawn(spec, argv, cwd="/", stdout=PIPE)
        assert proc.stdout is not None
        out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
        code = await proc.wait()
        proc.close_pipes()
        return code, out

    return run(main())


def shell_install(prefix: Path) -> Path:
    """A shell of its own under `prefix` (as uv or a CI cache installs an interpreter)."""
    (prefix / "bin").mkdir(parents=True)
    shell = prefix / "bin" / "sh"
    shutil.copy("/bin/sh", shell)
    return shell


def test_a_shebang_interpreter_under_the_private_tmp_is_bound_back(
        no_leaks: None, tmp_path: Path) -> None:
    shell = shell_install(tmp_path / "base")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    script = tmp_path / "venv" / "bin" / "tool"
    script.write_text(f"#!{shell}\necho ran; touch {shell}.x 2>/dev/null || echo read-only\n")
    script.chmod(0o755)
    assert output_of(SandboxSpec(readwrite_paths=()), [str(script)]) == (0, b"ran\nread-only\n")


def test_a_symlink_into_the_private_tmp_is_followed(no_leaks: None, tmp_path: Path) -> None:
    shell = shell_install(tmp_path / "base")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    link = tmp_path / "venv" / "bin" / "sh"
    link.symlink_to(shell)
    assert output_of(SandboxSpec(readwrite_paths=()), [str(link), "-c", "echo ran"]) == \
        (0, b"ran\n")


def test_an_interpreter_in_a_hidden_path_fails_naming_it(no_leaks: None, tmp_path: Path) -> None:
    shell = shell_install(tmp_path / "base")
    spec = SandboxSpec(readwrite_paths=(), hidden_paths=(str(tmp_path / "base"),))
    with pytest.raises(SandboxError) as e:
        output_of(spec, [str(shell), "-c", "true"])
    assert f"interpreter {shell} lies in {tmp_path / 'base'}, which hidden_paths hides" in str(e.value)
    assert e.value.hint is not None and "readonly_paths" in e.value.hint


def test_an_interpreter_directly_in_tmp_fails_with_the_fix(no_leaks: None) -> None:
    shell = Path(f"/tmp/nsprov-test-sh-{os.getpid()}")
    shutil.copy("/bin/sh", shell)
    try:
        with pytest.raises(SandboxError) as e:
            output_of(SandboxSpec(readwrite_paths=()), [str(shell), "-c", "true"])
    finally:
        shell.unlink()
    assert f"interpreter {shell} lies in /tmp, which the sandbox replaces" in str(e.value)
    assert e.value.hint is not None and "private_tmp = false" in e.value.hint


@pytest.mark.timeout(120 * SLOWDOWN)
def test_a_kernel_from_a_venv_under_tmp_starts_and_cant_change_it(tmp_path: Path) -> None:
    """The issue's case: a kernelspec whose python is a venv's under /tmp."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this test's packages (ipykernel ...) through a .pth, as a venv of its own would have them
    Path(purelib, "test-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    kernels = tmp_path / "kernels"
    (kernels / "tmpvenv").mkdir(parents=True)
    (kernels / "tmpvenv" / "kernel.json").write_text(json.dumps({
        "argv": [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": "tmpvenv", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "namespace-provisioner",
                                            "config": {}}}}))
    code = f"""
import errno, sys
try:
    open({str(venv / 'bin' / 'planted')!r}, 'w')
    print(sys.prefix, 'writable')
except OSError as e:
    print(sys.prefix, errno.errorcode[e.errno])
"""

    async def main() -> str:
        km = AsyncIOLoopKernelManager(
            kernel_name="tmpvenv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
        await km.start_kernel(cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        out: list[str] = []
        try:
            await kc.wait_for_ready(timeout=30 * SLOWDOWN)
            reply = await kc.execute_interactive(
                code, timeout=30 * SLOWDOWN,
                output_hook=lambda m: out.append(m["content"].get("text", "")))
            assert reply["content"]["status"] == "ok", reply
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        return "".join(out)

    assert run(main()).split() == [str(venv), "EROFS"]
    assert not (venv / "bin" / "planted").exists()
