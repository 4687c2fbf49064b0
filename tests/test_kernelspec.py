"""`nsprovisioner install` wraps installed kernelspecs, of any language."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from nsprovisioner.cli import main as cli_main
from nsprovisioner.kernel_launcher import kernel_argv

from .conftest import run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A source kernel 'src' (with a logo) on JUPYTER_PATH and an empty user data dir."""
    src = tmp_path / "path" / "kernels" / "src"
    src.mkdir(parents=True)
    (src / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Source", "language": "python", "interrupt_mode": "message",
        "env": {"FOO": "bar"}, "metadata": {"debugger": True}}))
    (src / "logo-64x64.png").write_bytes(b"\x89PNG not really")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "path"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def installed(where: Path, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((where / "kernels" / name / "kernel.json").read_text())
    return spec


def test_install_copies_the_source_and_adds_the_provisioner(jupyter_dirs: Path) -> None:
    assert cli_main(["install", "--from", "src", "--name", "src-sandboxed",
                     "--config", "memory_limit=1G", "--config", "pids_limit=100",
                     "--config", 'readonly_paths=["/usr"]']) == 0
    spec = installed(jupyter_dirs / "data", "src-sandboxed")
    assert spec["argv"][:3] == [sys.executable, "-m", "nsprovisioner.kernel_launcher"]
    assert kernel_argv(spec["argv"]) == [sys.executable, "-m", "ipykernel_launcher", "-f",
                                         "{connection_file}"]
    assert spec["env"] == {"FOO": "bar"} and spec["interrupt_mode"] == "message"
    assert spec["display_name"] == "Source, sandboxed: memory 1G, pids 100, +1 option"
    assert spec["metadata"]["debugger"] is True
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "namespace-provisioner",
        "config": {"memory_limit": "1G", "pids_limit": 100, "readonly_paths": ["/usr"]}}
    logo = jupyter_dirs / "data" / "kernels" / "src-sandboxed" / "logo-64x64.png"
    assert logo.read_bytes() == b"\x89PNG not really"


SHIPPED = Path(__file__).resolve().parent.parent / "share" / "jupyter" / "kernels" / \
    "python3-sandboxed"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_shipped_kernelspec_has_its_logos() -> None:
    assert png_size(SHIPPED / "logo-32x32.png") == (32, 32)
    assert png_size(SHIPPED / "logo-64x64.png") == (64, 64)
    svg = ElementTree.parse(SHIPPED / "logo-svg.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg" and svg.get("viewBox") == "0 0 64 64"
    shipped = json.loads((SHIPPED / "kernel.json").read_text())
    assert shipped["display_name"] == "Python 3 (sandboxed)"


def test_a_source_without_logos_gets_the_sandboxs(jupyter_dirs: Path) -> None:
    (jupyter_dirs / "path" / "kernels" / "src" / "logo-64x64.png").unlink()
    assert cli_main(["install", "--from", "src", "--name", "plain"]) == 0
    target = jupyter_dirs / "data" / "kernels" / "plain"
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        assert (target / logo).read_bytes() == (SHIPPED / logo).read_bytes(), logo


def test_display_names_cant_be_confused(jupyter_dirs: Path) -> None:
    """No option sets it apart: its name does; a title another kernel shows: likewise."""
    assert cli_main(["install", "--from", "src", "--name", "first"]) == 0
    assert installed(jupyter_dirs / "data", "first")["display_name"] == \
        "Source, sandboxed [first]"
    assert cli_main(["install", "--from", "src", "--name", "a", "--config", "network=none"]) == 0
    assert cli_main(["install", "--from", "src", "--name", "b", "--config", "network=none"]) == 0
    assert installed(jupyter_dirs / "data", "a")["display_name"] == \
        "Source, sandboxed: network none"
    assert installed(jupyter_dirs / "data", "b")["display_name"] == \
        "Source, sandboxed: network none [b]"


def test_install_to_a_prefix_with_a_display_name(jupyter_dirs: Path) -> None:
    prefix = jupyter_dirs / "prefix"
    assert cli_main(["install", "--from", "src", "--name", "Other", "--prefix", str(prefix),
                     "--display-name", "Sandboxed source"]) == 0
    spec = installed(prefix / "share" / "jupyter", "other")
    assert spec["display_name"] == "Sandboxed source"


@pytest.mark.parametrize("args, message", [
    (["--from", "missing", "--name", "x"], "no kernelspec named 'missing'"),
    (["--from", "src", "--name", "has space"], "may contain only letters"),
    (["--from", "src", "--name", "src"], "source kernel's own name"),
    (["--from", "src", "--name", "x", "--config", "memroy_limit=1G"], "did you mean"),
    (["--from", "src", "--name", "x", "--config", "pids_limit=0"], "pids_limit 0"),
    (["--from", "src", "--name", "x", "--config", "novalue"], "KEY=VALUE"),
])
def test_install_errors_name_the_problem(jupyter_dirs: Path, args: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["install", *args]) == 1
    assert message in capsys.readouterr().err
    assert not (jupyter_dirs / "data" / "kernels" / "x").exists()


def test_bash_kernel_from_pypi_runs_in_the_sandbox(jupyter_dirs: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   no_leaks: None) -> None:
    """A kernel that is not ipykernel: bash_kernel, installed as its docs say, then wrapped."""
    subprocess.run([sys.executable, "-m", "bash_kernel.install", "--prefix",
                    str(jupyter_dirs / "bashprefix")], check=True, capture_output=True)
    bash_dir = jupyter_dirs / "bashprefix" / "share" / "jupyter"
    assert cli_main(["install", "--from", "bash", "--name", "bash-sandboxed",
                     "--prefix", str(jupyter_dirs / "out")]) == 1  # bash is not on the path yet
    monkeypatch.setenv("JUPYTER_PATH", f"{bash_dir}{os.pathsep}{os.environ['JUPYTER_PATH']}")
    assert cli_main(["install", "--from", "bash", "--name", "bash-sandboxed",
                     "--prefix", str(jupyter_dirs / "out")]) == 0
    kernels = jupyter_dirs / "out" / "share" / "jupyter" / "kernels"

    async def main() -> None:
        km = AsyncKernelManager(kernel_name="bash-sandboxed",
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        out: list[str] = []
        try:
            await kc.wait_for_ready(timeout=30)
            reply = await kc.execute_interactive(
                "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; ls /proc | grep -c '^[0-9]'",
                timeout=15, output_hook=lambda m: out.append(m["content"].get("text", "")))
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
        lines = "".join(out).split("\n")
        assert lines[0].startswith("nsinit ") and "bash_kernel" in lines[0]
        assert lines[1] == "sandbox"
        assert int(lines[2]) < 10  # the sandbox's processes only
    run(main())
