"""The seccomp filter: built with libseccomp (cffi, ABI mode), handed to C as BPF.

The GrandChild installs the program as its last step before exec. Denied
calls fail with EPERM instead of killing, so a kernel that probes for a
feature gets an ordinary error. clone3 fails with ENOSYS: its flags live in
memory a filter can't read, and ENOSYS makes libc fall back to clone, whose
flags the filter checks. docs/security.md lists the rules and the reasons.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any

from cffi import FFI

from ._nsexec import ffi as kernel_ffi
from ._nsexec import lib as kernel
from .errors import SandboxError

log = logging.getLogger(__name__)

LIBSECCOMP = "libseccomp.so.2"
ARCHES = ("x86_64", "x86", "x32")  # the native one must be first; others where known

# The functions, loaded at run time (a host without libseccomp still runs
# sandboxes with seccomp = "off", or warns with strict = false). Their
# constants and struct scmp_arg_cmp come from <seccomp.h> through the
# compiler, in the _nsexec extension; the array of comparisons is passed here
# as the pointer it is.
_CDEF = """
typedef void *scmp_filter_ctx;
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
uint32_t seccomp_arch_native(void);
uint32_t seccomp_arch_resolve_name(const char *arch_name);
int seccomp_arch_add(scmp_filter_ctx ctx, uint32_t arch_token);
int seccomp_syscall_resolve_name(const char *name);
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const void *arg_array);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);
int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
"""

SCMP_ACT_ALLOW = kernel.SCMP_ACT_ALLOW
SCMP_FLTATR_CTL_OPTIMIZE = kernel.SCMP_FLTATR_CTL_OPTIMIZE
OPTIMIZE_BINARY_TREE = 2  # the attribute's value for a binary tree (libseccomp's docs)
SCMP_CMP_MASKED_EQ = kernel.SCMP_CMP_MASKED_EQ
NR_SCMP_ERROR = kernel.__NR_SCMP_ERROR
CLONE_NEWUSER = kernel.CLONE_NEWUSER
TIOCSTI = kernel.TIOCSTI
TIOCLINUX = kernel.TIOCLINUX

# Calls no kernel needs that reach into the host kernel's shared state, or
# would let code inside rearrange its own mounts (every mount is already
# locked or read-only; this closes the door before the lock is tested).
DENIED = (
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    # a large, often-patched attack surface of its own (Docker's default
    # profile, ChromeOS and Android deny it too); seccomp = "off" allows it
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "syslog", "acct",
    "open_by_handle_at", "name_to_handle_at",
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
)
# (syscall, argument index, mask, value): denied when (arg & mask) == value
DENIED_WITH_ARGS = (
    ("unshare", 0, CLONE_NEWUSER, CLONE_NEWUSER),
    ("clone", 0, CLONE_NEWUSER, CLONE_NEWUSER),
    # the kernel reads the request as 32 bits: mask so high bits can't dodge the rule
    ("ioctl", 1, 0xFFFFFFFF, TIOCSTI),
    ("ioctl", 1, 0xFFFFFFFF, TIOCLINUX),
)
ENOSYS_CALLS = ("clone3",)


def _errno_action(err: int) -> int:
    result: int = kernel.nsx_scmp_act_errno(err)  # SCMP_ACT_ERRNO(), a macro
    return result


def _load_libseccomp() -> tuple[FFI, Any]:
    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(LIBSECCOMP)


def _compile(ffi: FFI, sc: Any) -> bytes:
    ctx = sc.seccomp_init(SCMP_ACT_ALLOW)
    if ctx == ffi.NULL:
        raise SandboxError("seccomp_init failed", hint="libseccomp is broken or out of memory")
    try:
        # A binary tree of syscall numbers instead of a list: loading a filter
        # makes Linux (5.11+) run it for every syscall number of every ABI to
        # find the always-allowed ones, which with a list costs ~0.3 ms per
        # sandbox start. Before libseccomp 2.5 this fails: the list works too.
        sc.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, OPTIMIZE_BINARY_TREE)
        native = sc.seccomp_arch_native()
        for name in ARCHES:
            token = sc.seccomp_arch_resolve_name(name.encode())
            # The native arch is already in the filter (-EEXIST); a 32-bit ABI of
            # another native arch is simply not added.
            if token and token != native:
                sc.seccomp_arch_add(ctx, token)

        def rule(action: int, name: str, cmps: list[tuple[int, int, int]]) -> None:
            nr = sc.seccomp_syscall_resolve_name(name.encode())
            if nr == NR_SCMP_ERROR:
                raise SandboxError(f"libseccomp does not know the syscall {name}",
                                   hint="update libseccomp (`apt-get install libseccomp2`)")
            args = kernel_ffi.new("struct scmp_arg_cmp[]", [
                {"arg": arg, "op": SCMP_CMP_MASKED_EQ, "datum_a": mask, "datum_b": value}
                for arg, mask, value in cmps] or 1)
            address = int(kernel_ffi.cast("uintptr_t", args))
            rc = sc.seccomp_rule_add_array(ctx, action, nr, len(cmps),
                                           ffi.cast("const void *", address))
            if rc < 0:
                raise SandboxError(f"seccomp rule for {name} can't be added", errno=-rc)

        for name in DENIED:
            rule(_errno_action(errno.EPERM), name, [])
        for name, arg, mask, value in DENIED_WITH_ARGS:
            rule(_errno_action(errno.EPERM), name, [(arg, mask, value)])
        for name in ENOSYS_CALLS:
            rule(_errno_action(errno.ENOSYS), name, [])
        return _export(sc, ctx)
    finally:
        sc.seccomp_release(ctx)


def _export(sc: Any, ctx: Any) -> bytes:
    fd = os.memfd_create("nsprovisioner-seccomp", os.MFD_CLOEXEC)
    try:
        rc = sc.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SandboxError("seccomp_export_bpf failed", errno=-rc)
        size = os.fstat(fd).st_size
        program = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not program or len(program) % 8 or len(program) // 8 > 4096:
        raise SandboxError(f"libseccomp produced an invalid BPF program of {len(program)} bytes")
    return program


@functools.cache
def _default_filter(strict: bool) -> bytes | None:
    try:
        ffi, lib = _load_libseccomp()
    except OSError as e:
        hint = ("install it (`apt-get install libseccomp2`, `dnf install libseccomp`), "
                "or set seccomp = 'off'")
        if strict:
            raise SandboxError(f"seccomp = 'default' needs libseccomp ({LIBSECCOMP}), which "
                               f"can't be loaded: {e}", hint=hint) from None
        log.warning("libseccomp (%s) can't be loaded (%s): sandboxes run WITHOUT a seccomp "
                    "filter; %s", LIBSECCOMP, e, hint)
        return None
    return _compile(ffi, lib)


def build_filter(mode: str, strict: bool) -> bytes | None:
    """The BPF program for `mode` as bytes of struct sock_filter, or None for none.

    Built once per process (per `strict`); without libseccomp, strict raises
    SandboxError and non-strict logs one warning and returns None.
    """
    if mode == "off":
        return None
    if mode != "default":
        raise SandboxError(f"seccomp {mode!r} is not one of default, off")
    return _default_filter(strict)
