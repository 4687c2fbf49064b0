"""The boundary options of `nsprovisioner run`, end to end through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import PROBE_HELPERS

PROBE = PROBE_HELPERS + """
status = proc_status()
print(json.dumps({
    "hostname": os.uname().nodename,
    "seccomp": status["Seccomp"],
    "capeff": status["CapEff"],
    "hidden": err(os.listdir, os.environ["HIDDEN"]),
    "readonly": err(write, os.environ["READONLY"] + "/f"),
    "readwrite": err(write, os.environ["READWRITE"] + "/f"),
    "outside": err(write, os.environ["OUTSIDE"] + "/f"),
    "tmp_has_host_files": os.path.exists(os.environ["OUTSIDE"]),
}))
"""


def nsprovisioner_run(*args: str, cwd: Path, env: dict[str, str] | None = None
                      ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nsprovisioner.cli", "run", *args],
                          check=False, capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**os.environ, **(env or {})})


def dirs(tmp_path: Path) -> dict[str, str]:
    names = {"HIDDEN": "hidden", "READONLY": "ro", "READWRITE": "rw", "OUTSIDE": "outside"}
    for name in names.values():
        (tmp_path / name).mkdir()
    return {key: str(tmp_path / name) for key, name in names.items()}


def test_run_with_every_boundary_option(tmp_path: Path) -> None:
    env = dirs(tmp_path)
    proc = nsprovisioner_run(
        "--hostname", "box-1", "--hidden", env["HIDDEN"], "--readonly", env["READONLY"],
        "--readwrite", env["READWRITE"], "--readwrite", env["READONLY"] + "/..",
        "--no-private-tmp", "--seccomp", "off",
        "--", sys.executable, "-c", PROBE, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["hostname"] == "box-1" and r["seccomp"] == "0" and r["capeff"] == "0" * 16
    assert r["hidden"] == "EACCES"
    # tmp_path itself is writable (READONLY/..), its ro child is not: the deeper path wins
    assert r["readonly"] == "EROFS" and r["readwrite"] is None and r["outside"] is None
    assert r["tmp_has_host_files"] is True


def test_run_defaults_and_writable_root(tmp_path: Path) -> None:
    env = dirs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    default = nsprovisioner_run("--hidden", env["HIDDEN"], "--readonly", env["READONLY"],
                                "--", sys.executable, "-c", PROBE, cwd=work, env=env)
    assert default.returncode == 0, default.stderr
    r = json.loads(default.stdout)
    assert r["hostname"] == "sandbox" and r["seccomp"] == "2"
    assert r["tmp_has_host_files"] is False  # private /tmp hides the host's
    assert r["outside"] == "ENOENT"

    writable = nsprovisioner_run("--writable-root", "--no-private-tmp", "--hidden",
                                 env["HIDDEN"], "--readonly", env["READONLY"],
                                 "--", sys.executable, "-c", PROBE, cwd=work, env=env)
    assert writable.returncode == 0, writable.stderr
    r = json.loads(writable.stdout)
    assert r["outside"] is None and Path(env["OUTSIDE"], "f").exists()
    assert r["readonly"] == "EROFS" and r["hidden"] == "EACCES"


def test_run_with_a_bad_path_names_the_option(tmp_path: Path) -> None:
    proc = nsprovisioner_run("--readonly", "/nonexistent/nsx-data", "--", "true", cwd=tmp_path)
    assert proc.returncode == 125
    assert "readonly_paths entry '/nonexistent/nsx-data'" in proc.stderr
    assert "does not exist" in proc.stderr
