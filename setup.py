"""Build glue: the cffi extension (csrc/nsexec.c) and the init executable.

The init (csrc/nsinit.c) is a program of its own, not a module: it is
compiled and linked with the same compiler setuptools uses for extensions and
placed next to the package's modules as ``nsprovisioner/nsinit``.
"""
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import LinkError

C_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]


class BuildWithInit(build_ext):
    def run(self) -> None:
        super().run()
        self.build_init()

    def build_init(self) -> None:
        out_dir = "nsprovisioner" if self.inplace else os.path.join(self.build_lib, "nsprovisioner")
        os.makedirs(out_dir, exist_ok=True)
        objects = self.compiler.compile(
            ["csrc/nsinit.c"], output_dir=self.build_temp, include_dirs=["csrc"],
            extra_postargs=C_FLAGS,
        )
        try:
            # static: every sandbox start execs the init, and a static one
            # skips the dynamic loader's work
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
)
