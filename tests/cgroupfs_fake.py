"""A cgroup v2 tree in a tmp dir that behaves like cgroupfs where it matters.

New directories get the interface files of the controllers their parent
enables; subtree_control refuses controllers the cgroup wasn't offered
(ENOENT) and, outside the root, a domain controller (memory, io) while the
cgroup holds processes (EBUSY, the no-internal-processes rule). As Linux
does, it takes a threaded one (cpu, pids) anyway, and that makes the cgroup
a thread root: domain controllers then fail with EOPNOTSUPP, there and in
every cgroup below. cgroup.procs moves a pid; rmdir refuses a populated
cgroup. Only for checking the files written: the real
hierarchies are tested too.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path

from nsprovisioner.cgroupfs import CgroupHost, Hierarchy

CONTROLLER_FILES = {
    "memory": {"memory.max": "max", "memory.swap.max": "max", "memory.current": "0",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "io": {"io.max": ""},
}
# The controllers that work in threaded subtrees (Documentation/admin-guide/cgroup-v2.rst)
THREADED = {"cpu", "cpuset", "perf_event", "pids"}


class FakeCgroupfs(CgroupHost):
    def __init__(self, root: Path, *, own: str, controllers: str, delegated: str) -> None:
        super().__init__(v2=Hierarchy(2, str(root), frozenset(controllers.split()), own))
        self.root = root
        self.killed: list[str] = []
        self._files(root, {"cgroup.controllers": controllers,
                           "cgroup.subtree_control": delegated, "cgroup.procs": "",
                           "cpu.stat": "usage_usec 0\n"})
        path = root
        for part in own.strip("/").split("/") if own != "/" else []:
            path = path / part
            self.make_dir(str(path))
            self._files(path, {"cgroup.subtree_control": delegated})
        if own != "/":
            (path / "cgroup.subtree_control").write_text("")

    @property
    def own(self) -> str:
        assert self.v2 is not None and self.v2.own_path is not None
        return self.v2.own_path

    @own.setter
    def own(self, path: str) -> None:
        assert self.v2 is not None
        self.v2 = dataclasses.replace(self.v2, own_path=path)

    @staticmethod
    def _files(directory: Path, files: dict[str, str]) -> None:
        for name, content in files.items():
            (directory / name).write_text(content)

    def pids(self, cgroup: str) -> list[int]:
        text = (self.root / cgroup.strip("/") / "cgroup.procs").read_text()
        return [int(p) for p in text.split()]

    def add_process(self, cgroup: str, pid: int) -> None:
        self.write(str(self.root / cgroup.strip("/") / "cgroup.procs"), str(pid))

    def make_dir(self, path: str) -> None:
        os.mkdir(path)
        offered = Path(path).parent.joinpath("cgroup.subtree_control").read_text().split()
        files = {"cgroup.controllers": " ".join(offered), "cgroup.subtree_control": "",
                 "cgroup.type": "domain",
                 "cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n",
                 "cgroup.kill": "", "cgroup.freeze": "0", "cpu.stat": "usage_usec 0\n"}
        for c in offered:
            files.update(CONTROLLER_FILES.get(c, {}))
        self._files(Path(path), files)

    def write(self, path: str, text: str) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        directory = file.parent
        if file.name == "cgroup.subtree_control":
            self._enable(directory, text)
        elif file.name == "cgroup.procs":
            self._move(directory, int(text))
        elif file.name == "cgroup.kill":
            self.killed.append(str(directory))
            file.with_name("cgroup.procs").write_text("")
        else:
            file.write_text(text)

    def _holds_processes(self, directory: Path) -> bool:
        return directory != self.root and bool((directory / "cgroup.procs").read_text().strip())

    def _thread_root(self, directory: Path) -> bool:
        """Holds processes and enables a threaded controller (kernel/cgroup/cgroup.c)."""
        enabled = set((directory / "cgroup.subtree_control").read_text().split())
        return self._holds_processes(directory) and bool(enabled & THREADED)

    def _enable(self, directory: Path, text: str) -> None:
        enabled = (directory / "cgroup.subtree_control").read_text().split()
        offered = (directory / "cgroup.controllers").read_text().split()
        for token in text.split():
            c = token[1:]
            if c not in offered:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(directory))
            below_thread_root = any(self._thread_root(p) for p in directory.parents
                                    if p.is_relative_to(self.root))
            if below_thread_root or (c not in THREADED and self._thread_root(directory)):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), str(directory))
            if c not in THREADED and self._holds_processes(directory):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(directory))
            if token.startswith("+") and c not in enabled:
                enabled.append(c)
        (directory / "cgroup.subtree_control").write_text(" ".join(enabled))
        for child in directory.iterdir():  # the kernel adds the files to existing children
            if child.is_dir():
                (child / "cgroup.controllers").write_text(" ".join(enabled))
                for c in enabled:
                    for name, content in CONTROLLER_FILES.get(c, {}).items():
                        if not (child / name).exists():
                            (child / name).write_text(content)

    def _move(self, directory: Path, pid: int) -> None:
        if directory != self.root and (directory / "cgroup.subtree_control").read_text():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(directory))
        for procs in self.root.rglob("cgroup.procs"):
            pids = [p for p in procs.read_text().split() if p != str(pid)]
            procs.write_text("".join(f"{p}\n" for p in pids))
        with open(directory / "cgroup.procs", "a") as f:
            f.write(f"{pid}\n")

    def remove_dir(self, path: str) -> None:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if (directory / "cgroup.procs").read_text().strip() or \
                any(p.is_dir() for p in directory.iterdir()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        shutil.rmtree(directory)
