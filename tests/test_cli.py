"""The command-line entry points as installed: `nsprovisioner`, `jupyter nsprovisioner`."""

from __future__ import annotations

import os
import subprocess
import sys

from nsprovisioner import __version__

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def test_version_through_both_entry_points() -> None:
    for argv in (["nsprovisioner", "--version"], ["jupyter", "nsprovisioner", "--version"]):
        result = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=True)
        assert result.stdout.strip() == f"nsprovisioner {__version__}"


def test_jupyter_lists_the_provisioner() -> None:
    result = subprocess.run(["jupyter", "kernelspec", "provisioners"], capture_output=True,
                            text=True, env=ENV, check=True)
    assert "namespace-provisioner" in result.stdout
    assert "nsprovisioner.provisioner:NamespaceProvisioner" in result.stdout


def test_help_names_every_verb() -> None:
    result = subprocess.run(["nsprovisioner", "--help"], capture_output=True, text=True,
                            env=ENV, check=True)
    for verb in ("run", "install", "doctor"):
        assert verb in result.stdout


def test_run_without_a_command_is_a_usage_error() -> None:
    result = subprocess.run(["nsprovisioner", "run"], capture_output=True, text=True, env=ENV,
                            check=False)
    assert result.returncode == 2
    assert "give the command after --" in result.stderr
