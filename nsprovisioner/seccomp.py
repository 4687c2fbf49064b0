"""The seccomp filter (placeholder until the boundary issue lands)."""

from __future__ import annotations


def build_filter(mode: str, strict: bool) -> bytes | None:
    """The BPF program for `mode` as bytes of struct sock_filter, or None."""
    return None
