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


ffibuilder = FFI()
ffibuilder.cdef(header_declarations())
ffibuilder.set_source(
    "nsprovisioner._nsexec",
    '#include "nsexec.h"',
    sources=[str(CSRC / name) for name in ("nsclone.c", "nsexec.c", "nsmount.c", "nsnet.c",
                                                       "nsxsys.c")],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-std=gnu11"],
    # Every symbol bound at load: the clone stages share the server's memory
    # and must never enter the dynamic linker's lazy binding.
    extra_link_args=["-Wl,-z,now"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
