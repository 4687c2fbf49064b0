"""Building the seccomp filter: libseccomp through cffi, cached, and its absence."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from nsprovisioner import SandboxError, SandboxSpec, seccomp

from .test_boundary import probe


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    seccomp._default_filter.cache_clear()
    yield
    seccomp._default_filter.cache_clear()


@pytest.fixture
def no_libseccomp(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    monkeypatch.setattr(seccomp, "LIBSECCOMP", "libseccomp-not-installed.so.2")


def test_filter_is_bpf_built_once_per_process(fresh_cache: None) -> None:
    program = seccomp.build_filter("default", True)
    assert program is not None and len(program) % 8 == 0  # struct sock_filter
    # every program libseccomp exports starts by loading the arch (seccomp_data + 4)
    assert program[:8] == bytes.fromhex("2000000004000000")
    assert seccomp.build_filter("default", True) is program
    assert seccomp.build_filter("off", True) is None


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(SandboxError, match="not one of default, off"):
        seccomp.build_filter("strict", True)


def test_missing_libseccomp_in_strict_mode_names_the_package(no_libseccomp: None) -> None:
    with pytest.raises(SandboxError) as info:
        seccomp.build_filter("default", True)
    assert "apt-get install libseccomp2" in str(info.value)
    assert "seccomp = 'off'" in str(info.value)


def test_missing_libseccomp_without_strict_warns_once_and_runs_unfiltered(
        no_libseccomp: None, no_leaks: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nsprovisioner.seccomp"):
        assert seccomp.build_filter("default", False) is None
        assert seccomp.build_filter("default", False) is None
        r = probe(SandboxSpec(strict=False), """
            out["seccomp"] = read("/proc/self/status").split("Seccomp:")[1].split()[0]
        """)
    warnings = [rec for rec in caplog.records if rec.name == "nsprovisioner.seccomp"]
    assert len(warnings) == 1 and "WITHOUT a seccomp filter" in warnings[0].getMessage()
    assert r["seccomp"] == "0"
