"""Build glue: the cffi extension (csrc/nsclone.c) and the helper program.

The helper (csrc/nsinit.c and the stages it runs) is a program of its own,
not a module: it is compiled and linked with the same compiler setuptools
uses for extensions and placed next to the package's modules as
``nsprovisioner/nsinit``. Warnings don't fail a user's build; CI adds
-Werror through CFLAGS.
"""
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import LinkError

C_FLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
# The helper is every C file but the server side's clone (the cffi extension):
# the same rule in scripts/asan-test.sh and tests/test_csrc.py.
SERVER_SIDE_SOURCE = "csrc/nsclone.c"
HELPER_SOURCES = sorted(str(p) for p in Path("csrc").glob("*.c") if str(p) != SERVER_SIDE_SOURCE)


class BuildWithInit(build_ext):
    def run(self) -> None:
        super().run()
        self.build_init()

    def build_init(self) -> None:
        out_dir = "nsprovisioner" if self.inplace else os.path.join(self.build_lib, "nsprovisioner")
        os.makedirs(out_dir, exist_ok=True)
        objects = self.compiler.compile(
            HELPER_SOURCES, output_dir=self.build_temp, include_dirs=["csrc"],
            extra_postargs=C_FLAGS,
        )
        try:
            # static: every sandbox start execs the helper, and a static one
            # skips the dynamic loader's work and shares its pages through the memfd
            self.compiler.link_executable(objects, "nsinit", output_dir=out_dir,
                                          extra_postargs=["-static-pie"])
        except LinkError:
            self.compiler.link_executable(objects, "nsinit", output_dir=out_dir)

    def get_outputs(self) -> list[str]:
        out_dir = "nsprovisioner" if self.inplace else os.path.join(self.build_lib, "nsprovisioner")
        return [*super().get_outputs(), os.path.join(out_dir, "nsinit")]


setup(
    cffi_modules=["nsprovisioner/_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithInit},
    # cffi builds the extension for the stable ABI (_nsexec.abi3.so), and the
    # helper is a program: one wheel serves every CPython from 3.10
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
