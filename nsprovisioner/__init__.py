"""nsprovisioner: every Jupyter kernel in its own Linux namespaces and cgroup."""

from .errors import SandboxError
from .process import SandboxProcess
from .sandbox import SandboxSpec
from .spawn import DEVNULL, PIPE, spawn

__version__ = "0.1.0"
__all__ = ["DEVNULL", "PIPE", "SandboxError", "SandboxProcess", "SandboxSpec", "__version__",
           "spawn"]
