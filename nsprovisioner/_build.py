"""The cffi builder: set_source and cdef only (the C lives in csrc/)."""
from pathlib import Path

from cffi import FFI

# Relative: setuptools refuses absolute source paths, and builds run from the
# project's root.
CSRC = Path("csrc")


def header_declarations() -> str:
    """The part of nsexec.h between the cdef markers: one source of truth."""
    text = (CSRC / "nsexec.h").read_text()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


# Kernel numbers the Python side needs, supplied by the compiler ("...")
# instead of copied by hand.
KERNEL_CONSTANTS = """
#define CLONE_NEWNS ...
#define CLONE_NEWUTS ...
#define CLONE_NEWIPC ...
#define CLONE_NEWPID ...
#define CLONE_NEWNET ...
#define CLONE_NEWUSER ...
#define TIOCSTI ...
#define TIOCLINUX ...
"""

# libseccomp's numbers and struct, from its header (seccomp.py loads the
# library itself at run time, so a host without it can still run sandboxes
# without a filter).
LIBSECCOMP_DECLARATIONS = """
#define SCMP_ACT_ALLOW ...
#define __NR_SCMP_ERROR ...
enum scmp_filter_attr { SCMP_FLTATR_CTL_OPTIMIZE, ... };
enum scmp_compare { SCMP_CMP_MASKED_EQ, ... };
struct scmp_arg_cmp {
    unsigned int arg;
    enum scmp_compare op;
    uint64_t datum_a;
    uint64_t datum_b;
    ...;
};
uint32_t nsx_scmp_act_errno(uint16_t err);
"""

ffibuilder = FFI()
ffibuilder.cdef(header_declarations())
ffibuilder.cdef(KERNEL_CONSTANTS)
ffibuilder.cdef(LIBSECCOMP_DECLARATIONS)
ffibuilder.set_source(
    "nsprovisioner._nsexec",
    # (Python.h, included first, defines _GNU_SOURCE, which the CLONE_* need)
    '#include <sched.h>\n#include <sys/ioctl.h>\n#include <seccomp.h>\n#include "nsexec.h"\n'
    "static uint32_t nsx_scmp_act_errno(uint16_t err) { return SCMP_ACT_ERRNO(err); }",
    # only the clone that starts the helper: the helper itself is a program
    # (setup.py builds it)
    sources=[str(CSRC / "nsclone.c")],
    include_dirs=[str(CSRC)],
    # warnings, not errors: CI adds -Werror through CFLAGS (scripts/test-all.sh)
    extra_compile_args=["-Wall", "-Wextra", "-std=gnu11"],
    # every symbol bound at load: the clone must not enter the dynamic
    # linker's lazy binding on the server's memory
    extra_link_args=["-Wl,-z,now"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
