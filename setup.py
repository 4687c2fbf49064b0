"""Build glue: the cffi extension (csrc/nsclone.c) and the helper program.

The helper (csrc/nsinit.c and the stages it runs) is a program of its own,
not a module: it is compiled and linked with the same compiler setuptools
uses for extensions and placed next to the package's modules as
``nsprovisioner/nsinit``. Warnings don't fail a user's build; CI adds
-Werror through CFLAGS.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError, LinkError

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


# The JupyterLab extension (labextension/, TypeScript) is built here, from the
# npm registry, into labextension/prebuilt/, and installed as every prebuilt
# Jupyter extension is: under <prefix>/share/jupyter/labextensions/<name>/.
# No built JavaScript is committed. NSPROV_NO_LABEXTENSION=1 builds without it.
LAB_SOURCE = Path("labextension")
LAB_OUTPUT = LAB_SOURCE / "prebuilt"
LAB_NAME = "nsprovisioner-lab"


def _newest(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def build_labextension() -> None:
    inputs = [LAB_SOURCE / name for name in ("package.json", "package-lock.json",
                                             "tsconfig.json", "core/package.json")]
    inputs += [*(LAB_SOURCE / "src").rglob("*"), *(LAB_SOURCE / "style").rglob("*")]
    built = LAB_OUTPUT / "package.json"
    if built.is_file() and built.stat().st_mtime >= _newest(inputs):
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise ExecError("building the JupyterLab extension needs node and npm: install them "
                        "(`apt-get install nodejs npm`), or set NSPROV_NO_LABEXTENSION=1 to "
                        "build without the extension")
    installed = LAB_SOURCE / "node_modules" / ".package-lock.json"
    steps = [] if installed.is_file() and installed.stat().st_mtime >= _newest(inputs[:2]) \
        else [[npm, "ci", "--no-audit", "--no-fund"]]
    for step in [*steps, [npm, "run", "build"]]:
        try:
            subprocess.run(step, cwd=LAB_SOURCE, check=True)
        except subprocess.CalledProcessError as e:
            raise ExecError(f"building the JupyterLab extension failed: `{' '.join(step)}` in "
                            f"{LAB_SOURCE} exited with {e.returncode} (its output is above)") from None


class BuildWithLabextension(build_py):
    def run(self) -> None:
        super().run()
        if os.environ.get("NSPROV_NO_LABEXTENSION") == "1":
            return
        build_labextension()
        if self.distribution.data_files is None:
            self.distribution.data_files = []
        files = self.distribution.data_files  # install_data holds this very list
        for directory in sorted({p.parent for p in LAB_OUTPUT.rglob("*") if p.is_file()}):
            target = Path("share/jupyter/labextensions", LAB_NAME,
                          directory.relative_to(LAB_OUTPUT))
            files.append((str(target), sorted(str(p) for p in directory.iterdir() if p.is_file())))


setup(
    cffi_modules=["nsprovisioner/_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithInit, "build_py": BuildWithLabextension},
    # cffi builds the extension for the stable ABI (_nsexec.abi3.so), and the
    # helper is a program: one wheel serves every CPython from 3.10
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
