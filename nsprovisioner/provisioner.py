"""NamespaceProvisioner: Jupyter's kernel lifecycle, each kernel in its own sandbox.

This is the Parent of the seed's diagram as Jupyter sees it. It keeps
LocalProvisioner's lifecycle (ports, connection file, encryption keys and the
kernel command are LocalProvisioner's pre_launch, unchanged) and replaces
only the launcher: the kernel's argv goes through spawn(), and from then on
the sandbox's init is held by a pidfd. Signals sent to the init reach the
kernel's whole process group, as LocalProvisioner's killpg does.

Every call runs on the Jupyter server's event loop thread, never in an
executor: the sandbox's PR_SET_PDEATHSIG fires when the thread that cloned it
exits, so a worker thread would take its kernels down with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from typing import Any, ClassVar

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Dict, Float, Int, List, Unicode, Union

from .cgroup_layout import sweep_stale_cgroups
from .egress import DEFAULT_EGRESS_DENY
from .errors import SandboxError
from .ipcdir import endpoint as socket_endpoint
from .ipcdir import (
    expose_only,
    make_socket_dir,
    record_connection_file,
    remove_socket_dir,
    remove_tree,
    sweep_dead_servers,
)
from .jupyter_log import mark_logged, route_library_log, warnings_of_launch
from .kernel_events import DEGRADED, KILLED, START_FAILED, events
from .kernel_launcher import kernel_argv
from .kernelsandbox import (
    CONFIG_KEYS,
    DEFAULT_ENV_KEEP,
    check_env_keep,
    check_keys,
    hide_runtime_dirs,
    merge_spec,
    sandboxed_kernel_env,
    visible_in_sandbox,
)
from .mounts import PathPins
from .pool import (
    ForegroundStarts,
    KernelPool,
    check_pool_size,
    pool_for,
    retire_pools,
    waiting_in_this_process,
)
from .pooled_kernel import PooledKernel, Target, request_target
from .process import SandboxProcess
from .relay import OutputRelay
from .sandbox import (
    DEFAULT_NAMESPACES,
    DEFAULT_NPROC_LIMIT,
    DEFAULT_READWRITE,
    DEFAULT_STATE_DIR,
    DEFAULT_TMP_SIZE,
    DEFAULT_USER_COUNTERS,
    SandboxSpec,
)
from .spawn import DEVNULL, PIPE, command_env, spawn

# The arguments jupyter_client's KernelProvisionerFactory passes besides the
# kernelspec's options.
_BASE_ARGUMENTS = frozenset({"kernel_id", "kernel_spec", "parent", "config", "log"})
POOL_SIZE = "pool_size"  # a provisioner option, not the sandbox's: pool.py
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
# A launch returns once the kernel listens (see launch_kernel), polling this often,
# or after this long: a kernel that binds later is then connected to as
# LocalProvisioner's are, by the clients' reconnects.
LISTEN_POLL = 0.005
LISTEN_WAIT = 10.0


def _is_socket(path: str) -> bool:
    """lstat, never stat: the socket dir is the kernel's to write (a symlink a
    notebook left there must not make the server's loop follow it anywhere)."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


class NamespaceProvisioner(LocalProvisioner):
    """Starts each kernel as the init's child in fresh Linux namespaces and its own cgroup.

    Options are set in Jupyter config (`c.NamespaceProvisioner.memory_limit = "2G"`)
    or per kernelspec in `metadata.kernel_provisioner.config`; the kernelspec wins.
    """

    user = Unicode("self", config=True,
                   help="'self': run as your own uid/gid inside; 'root': as uid 0 (no "
                   "capabilities outside the sandbox)")
    uid_map = Union([List(), Unicode()], default_value=None, allow_none=True, config=True,
                    help="uid ranges 'inside:outside:count'; more than your own id needs "
                    "newuidmap and /etc/subuid")
    gid_map = Union([List(), Unicode()], default_value=None, allow_none=True, config=True,
                    help="as uid_map, for gids (/etc/subgid)")
    namespaces = List(Unicode(), default_value=list(DEFAULT_NAMESPACES), config=True,
                      help="namespaces to create; user, pid and mount are always needed")
    init = Bool(True, config=True,
                help="run the kernel under a tiny init that forwards signals and reaps "
                "zombies; False makes the kernel itself PID 1")
    network = Unicode("host", config=True,
                      help="'host' shares the server's network; 'none' gives only loopback; "
                      "'egress': outbound internet through pasta, without the host, its "
                      "loopback, the LAN or link-local (cloud metadata)")
    egress_deny = List(Unicode(), default_value=list(DEFAULT_EGRESS_DENY), config=True,
                       help="with network 'egress': address ranges the kernel can't reach; "
                       "[] allows the LAN (the host, loopback and link-local stay denied)")
    memory_limit = Union([Unicode(), Int()], default_value=None, allow_none=True, config=True,
                         help="memory (and swap) limit, e.g. '2G'")
    cpu_limit = Float(None, allow_none=True, config=True, help="CPU limit in cores, e.g. 1.5")
    pids_limit = Int(None, allow_none=True, config=True, help="most processes at once")
    readonly_root = Bool(True, config=True, help="the host's filesystem is read-only inside")
    readwrite_paths = List(Unicode(), default_value=list(DEFAULT_READWRITE), config=True,
                           help="writable paths; '~' and '{cwd}' are expanded")
    readonly_paths = List(Unicode(), default_value=[], config=True, help="read-only paths")
    hidden_paths = List(Unicode(), default_value=[], config=True,
                        help="paths replaced by an empty, unreadable mount")
    private_tmp = Bool(True, config=True, help="a private /tmp and /var/tmp")
    devices = List(Unicode(), default_value=[], config=True,
                   help="host device nodes or globs under /dev bound at the same path")
    gpus = Union([Unicode(), List(Int())], default_value="none", config=True,
                 help="GPUs to bind with the nodes their drivers need: 'none', 'all' or "
                 "a list of indices")
    private_run = Bool(True, config=True,
                       help="a private /run: the host's Unix sockets there are out of reach")
    tmp_size = Union([Unicode(), Int()], default_value=DEFAULT_TMP_SIZE, config=True,
                     help="size of the private /tmp, /var/tmp and /dev/shm each: a share of "
                     "RAM ('10%') or a size ('2G')")
    protect_home = Bool(True, config=True,
                        help="home's top-level dot entries and ~/bin, Jupyter's config and data "
                        "dirs and the server's Python are read-only inside")
    protected_paths = List(Unicode(), default_value=[], config=True,
                           help="more paths that are read-only inside even below a writable one")
    writable_dotfiles = List(Unicode(), default_value=[], config=True,
                             help="top-level dot entries of home left writable, e.g. '.cache'")
    state_dir = Unicode(DEFAULT_STATE_DIR, allow_none=True, config=True,
                        help="the sandboxes' own writable state (caches, IPython dir, pip "
                        "installs); null: none")
    nproc_limit = Int(DEFAULT_NPROC_LIMIT, allow_none=True, config=True,
                      help="RLIMIT_NPROC inside: most processes and threads of the kernel's user "
                      "in its sandbox")
    user_counters = Dict(per_key_traits=None, default_value=dict(DEFAULT_USER_COUNTERS),
                         config=True, help="the sandbox's share of /proc/sys/user counters")
    hostname = Unicode("sandbox", allow_none=True, config=True, help="hostname inside")
    env_keep = List(Unicode(), default_value=list(DEFAULT_ENV_KEEP), config=True,
                    help="the server's environment variables the kernel gets (glob patterns "
                    "such as LC_* allowed); the kernelspec's env is always passed")
    seccomp = Unicode("default", config=True, help="'default' seccomp filter or 'off'")
    strict = Bool(True, config=True,
                  help="fail (True) or warn (False) when the host can't enforce a setting")
    pool_size = Int(0, config=True,
                    help="kernels kept started ahead per kernelspec and config, each handed "
                    "out once (a start in milliseconds; each holds its memory while it "
                    "waits); 0: none")
    cgroup_parent = Unicode("auto", config=True,
                            help="'auto' or the absolute cgroup path under which each "
                            "kernel's cgroup is made")

    def __init__(self, **kwargs: Any) -> None:
        # The kernelspec's options arrive as constructor arguments. They are
        # kept apart, unchecked, so that a bad one fails the kernel start
        # with a message naming the kernelspec, instead of a TraitError
        # from deep inside jupyter_client.
        self.kernelspec_options = {key: kwargs.pop(key) for key in list(kwargs)
                                   if key not in _BASE_ARGUMENTS}
        super().__init__(**kwargs)
        self.sandbox: SandboxProcess | None = None
        self.spec: SandboxSpec | None = None
        self.sandbox_pid: int | None = None
        self.socket_dir: str | None = None  # this kernel's ipc sockets
        self.path_pins = PathPins()  # what its paths resolved to at the first start
        self.relay: OutputRelay | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.env_allowed: tuple[str, ...] = tuple(self.env_keep)
        self.pooled = False  # whether the kernel running now came from the pool
        self.pool_runtime_dir: str | None = None  # its connection file's directory
        self._pool: KernelPool | None = None  # the pool of this start
        self._pooled: PooledKernel | None = None  # the kernel taken from it
        self._pooled_warnings: list[str] = []  # what its sandbox's start left out
        self._base_spec: SandboxSpec | None = None
        self._runtime_dirs: list[str] = []

    @property
    def kernelspec_name(self) -> str:
        name = getattr(self.parent, "kernel_name", None)
        if not name and self.kernel_spec is not None:
            name = os.path.basename(self.kernel_spec.resource_dir or "")
        return str(name or "?")

    def _where(self) -> tuple[str, str]:
        resource_dir = getattr(self.kernel_spec, "resource_dir", None) or "?"
        kernel_json = os.path.join(resource_dir, "kernel.json")
        in_kernelspec = (f"kernelspec {self.kernelspec_name!r} ({kernel_json}) "
                         "metadata.kernel_provisioner.config")
        return "c.NamespaceProvisioner (Jupyter config)", in_kernelspec

    def resolve_options(self) -> tuple[SandboxSpec, tuple[str, ...]]:
        """The sandbox and env allow-list for the next launch; SandboxError names a bad value."""
        config_where, kernelspec_where = self._where()
        check_keys(self.kernelspec_options, kernelspec_where)
        configured = {key: getattr(self, key) for key in CONFIG_KEYS}
        keep = check_env_keep(configured["env_keep"], config_where)
        if "env_keep" in self.kernelspec_options:
            keep = check_env_keep(self.kernelspec_options["env_keep"], kernelspec_where)
        spec = merge_spec(configured, self.kernelspec_options, config_where, kernelspec_where)
        return spec, keep

    def resolve_pool_size(self) -> int:
        config_where, kernelspec_where = self._where()
        if POOL_SIZE in self.kernelspec_options:
            return check_pool_size(self.kernelspec_options[POOL_SIZE], kernelspec_where)
        return check_pool_size(self.pool_size, config_where)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """LocalProvisioner's pre_launch (connection file, ports, command), then the sandbox."""
        route_library_log(self.log)
        # Options first: a bad one must fail before a connection file exists.
        try:
            spec, self.env_allowed = self.resolve_options()
            pool_size = self.resolve_pool_size()
        except SandboxError as e:
            self._record_start_failure(e)
            raise
        self._sweep_once(spec.cgroup_parent)
        km = self.parent
        self._base_spec, self._pool = spec, None
        if self.socket_dir is None and km is not None:  # a first start, not a restart
            if pool_size > 0:
                self._pool = pool_for(self.kernelspec_name, spec, self.log)
                self._pooled = self._pool.take()
                if self._pooled is not None:
                    self.socket_dir = self._pooled.socket_dir
            else:
                retire_pools(self.kernelspec_name, self.log)
        if km is not None:
            self._use_ipc_transport(km)
        self.spec = spec  # _finalize_env, called by super().pre_launch, reads it
        try:
            kwargs = await super().pre_launch(**kwargs)
        except BaseException:
            if self._pooled is not None and self._pool is not None:
                self._pool.discard(self._pooled, "its request failed before the launch")
                self._pooled = self.socket_dir = None
            raise
        if km is not None and km.connection_file:
            self._runtime_dirs = sorted({jupyter_runtime_dir(),
                                         os.path.dirname(km.connection_file)})
            spec = hide_runtime_dirs(spec, self._runtime_dirs, km.connection_file)
            if self.socket_dir is not None:
                record_connection_file(self.socket_dir, km.connection_file)
        if self.socket_dir is not None:
            spec = expose_only(spec, self.socket_dir)
        self.spec = spec
        return kwargs

    def _use_ipc_transport(self, km: Any) -> None:
        """ipc sockets in this kernel's own directory, before the connection file is
        written: loopback TCP can't cross into a private network namespace, and on
        the host's network any local process could subscribe to the kernel's iopub
        (ipcdir.py). The directory outlives restarts; cleanup() removes it."""
        if self.socket_dir is None:
            self.socket_dir = make_socket_dir(self.kernel_id)
        km.transport = "ipc"
        km.ip = socket_endpoint(self.socket_dir)
        km.cache_ports = False

    _swept: ClassVar[set[str]] = set()  # cgroup parents swept by this process

    def _sweep_once(self, cgroup_parent: str) -> None:
        """Remove the cgroups of sandboxes whose server died, once per parent and process."""
        if cgroup_parent in NamespaceProvisioner._swept:
            return
        NamespaceProvisioner._swept.add(cgroup_parent)
        if len(NamespaceProvisioner._swept) == 1:
            try:
                files = sweep_dead_servers(jupyter_runtime_dir())
            except (OSError, SandboxError) as e:
                self.log.warning("could not sweep the sockets of servers that died: %s", e)
            else:
                if files:
                    self.log.info("removed %d socket dir(s) and connection file(s) of servers that died: %s",
                                  len(files), ", ".join(files))
        try:
            removed = sweep_stale_cgroups(cgroup_parent)
        except OSError as e:
            self.log.warning("could not sweep stale sandbox cgroups: %s", e)
            return
        if removed:
            self.log.info("removed %d cgroup(s) left by servers that died: %s", len(removed),
                          ", ".join(removed))

    def _finalize_env(self, env: dict[str, str]) -> None:
        super()._finalize_env(env)
        if self.spec is None:
            raise SandboxError("the kernel's environment was asked for before its sandbox")
        kept = sandboxed_kernel_env(env, self.env_allowed,
                                    getattr(self.kernel_spec, "env", {}) or {}, self.spec,
                                    self.kernelspec_name)
        env.clear()
        env.update(kept)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel in a new sandbox; a SandboxError leaves no file or process behind."""
        if self.spec is None:
            raise SandboxError("launch_kernel called before pre_launch")
        self.cwd = kwargs.get("cwd") or os.getcwd()
        # Never one of the server's own fds (its log, its terminal): pipes we
        # relay into the log, unless the caller asked for pipes or nothing.
        stdio = [kwargs.get(name) for name in ("stdout", "stderr")]
        stdout, stderr = (s if s in (PIPE, DEVNULL) else PIPE for s in stdio)
        cmd = kernel_argv(cmd)  # we are the sandbox the kernelspec's launcher prefix asks for
        pool, self._pool = self._pool, None
        target = None
        if pool is not None and self.parent is not None and self._base_spec is not None:
            target = request_target(self._base_spec, cmd, kwargs.get("env") or {},
                                    str(self.cwd), self.parent.connection_file,
                                    self._runtime_dirs, all(s is None for s in stdio),
                                    self.kernelspec_name,
                                    "curve_publickey" in self.connection_info)
        started_here = False
        try:
            proc = await self._from_pool(pool, target, cmd, kwargs.get("env") or {})
            left_out = list(self._pooled_warnings)  # what its start left out
            if proc is None:
                ForegroundStarts.begin()
                started_here = True
                with warnings_of_launch() as left_out:
                    proc = await spawn(self.spec, cmd, env=kwargs.get("env"), cwd=self.cwd,
                                       stdin=DEVNULL, stdout=stdout, stderr=stderr,
                                       name=self.kernel_id, path_pins=self.path_pins,
                                       # a kernel runs notebook code only once launched
                                       network_before_exec=False)
        except BaseException as e:
            # jupyter_client calls cleanup() only after a successful start.
            await self._discard_launch_files()
            if isinstance(e, SandboxError):
                self._record_start_failure(e)
            if started_here:
                ForegroundStarts.end()
            raise
        self.sandbox = proc  # first: whatever fails below, shutdown finds the kernel
        self.sandbox_pid = proc.pid
        try:
            for warning in left_out:
                events.record(self.kernel_id, self.kernelspec_name, DEGRADED, warning)
            proc.add_exit_callback(self._report_exit)
            relayed = {name: getattr(proc, name) for name, asked in
                       (("stdout", stdio[0]), ("stderr", stdio[1]))
                       if asked not in (PIPE, DEVNULL)}
            self.relay = OutputRelay(self.log, self.kernel_id, relayed) if relayed else None
            if pool is not None:
                # a request no pooled kernel could serve leaves the pool as it is
                pool.want(target or pool.target, self.resolve_pool_size(), self.log)
            if started_here:
                await self._until_listening(proc)
        finally:
            if started_here:  # or the pool's refills would wait for it for ever
                ForegroundStarts.end()
        return self.connection_info

    async def _until_listening(self, proc: SandboxProcess) -> None:
        """Until the kernel has bound its ipc sockets, exited, or LISTEN_WAIT passed.
        LocalProvisioner returns at once, and the server's clients connect before the
        kernel binds: each retries every 100 ms (zmq's reconnect interval), and
        jupyter_server's websocket "nudge" resends kernel_info only every 0.5 s until
        its activity watcher has seen the kernel's status, which that watcher misses
        when its subscription is late. In JupyterLab that put a fresh kernel's first
        output 0.5 s later in about a third of the starts, local or sandboxed
        (benchmarks/lab_first_output.py). A kernel that is already listening when
        the server connects to it answers the first nudge."""
        sockets = self._socket_paths()
        deadline = time.monotonic() + LISTEN_WAIT
        while (sockets and not all(_is_socket(p) for p in sockets)
               and proc.poll() is None and time.monotonic() < deadline):
            await asyncio.sleep(LISTEN_POLL)

    def _socket_paths(self) -> list[str]:
        """The kernel's ipc sockets, once it listens; [] over tcp."""
        info: dict[str, Any] = dict(self.connection_info)
        ip = info.get("ip")
        if info.get("transport") != "ipc" or not isinstance(ip, str):
            return []
        return [f"{ip}-{info[key]}" for key in PORT_KEYS if key in info]

    async def _from_pool(self, pool: KernelPool | None, target: Target | None, cmd: list[str],
                         env: dict[str, str]) -> SandboxProcess | None:
        """The running kernel taken from the pool in pre_launch, made this kernel (its
        connection info is this kernel's: jupyter_client adopts what launch_kernel
        returns and rewrites the connection file with it); None when there is none or
        it was made for another request (it is then discarded, and this kernel starts
        the ordinary way, in its socket dir)."""
        pooled, self._pooled = self._pooled, None
        self.pooled = False
        self._pooled_warnings = []
        if pooled is None or pool is None:
            return None
        if target is None or pooled.target != target:
            pool.discard(pooled, "made for another request", keep_socket_dir=True)
            self.log.info("kernel %s (%s): the pool's kernels were made for another cwd, "
                          "environment or command; starting it the ordinary way",
                          self.kernel_id, self.kernelspec_name)
            return None
        assert self.spec is not None and self.parent is not None
        try:
            await pooled.hand_out(self.parent.connection_file, command_env(self.spec, env), cmd)
        except OSError as e:
            pool.discard(pooled, f"the hand-out failed: {e}", keep_socket_dir=True)
            self.log.warning("kernel %s (%s): the pooled kernel could not take the request "
                             "(%s); starting it the ordinary way", self.kernel_id,
                             self.kernelspec_name, e)
            return None
        self.pooled = True
        self._pooled_warnings = pooled.warnings
        self.connection_info = dict(pooled.connection_info)  # type: ignore[assignment]
        self.path_pins = pooled.pins
        self.pool_runtime_dir = pooled.runtime_dir
        self.log.info("kernel %s (%s) came from the pool: sandbox %s, pid %d, started "
                      "%.1f s ago", self.kernel_id, self.kernelspec_name, pooled.name,
                      pooled.proc.pid, time.monotonic() - pooled.started)
        return pooled.proc

    async def post_launch(self, **kwargs: Any) -> None:
        """When the restarter stops restarting a kernel that keeps dying, jupyter_server
        drops the kernel without calling cleanup(): the files must go then. (The
        restarter exists from here on; a restart keeps the same one.)"""
        await super().post_launch(**kwargs)
        km = self.parent
        if km is not None and hasattr(km, "add_restart_callback"):
            km.remove_restart_callback(self._restarter_gave_up, "dead")
            km.add_restart_callback(self._restarter_gave_up, "dead")

    def _restarter_gave_up(self) -> None:
        self.log.warning("kernel %s keeps dying and will not be restarted; removing its "
                         "connection file and sockets", self.kernel_id)
        task = asyncio.ensure_future(self._discard_launch_files())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _discard_launch_files(self) -> None:
        km = self.parent
        if km is not None:
            km.cleanup_connection_file()
            km.cleanup_ipc_files()
        await self.cleanup(restart=False)

    def _record_start_failure(self, e: SandboxError) -> None:
        """Logged here, once: the server's own records of it, each with a full traceback,
        are dropped (jupyter_log.py); JupyterLab shows it as a notification."""
        self.log.error("kernel %s (%s) could not start in its sandbox: %s",
                       self.kernel_id, self.kernelspec_name, e)
        mark_logged(e)
        events.record(self.kernel_id, self.kernelspec_name, START_FAILED,
                      f"{self.kernelspec_name} could not start in its sandbox: {e.cause}", e.hint)

    def _report_exit(self, proc: SandboxProcess) -> None:
        """Say so when the kernel died of its memory limit: Jupyter only sees 'dead'."""
        oom_kill_count = getattr(proc.cgroup, "oom_kill_count", None)
        if oom_kill_count is None:
            return
        try:
            killed = oom_kill_count()
        except OSError as e:
            self.log.debug("kernel %s: can't read its OOM count: %s", self.kernel_id, e)
            return
        if killed > 0:
            limit = self.spec.memory_bytes if self.spec is not None else None
            shown = f"{limit // 2**20} MiB" if limit else "none set"
            reason = f"killed: out of memory (limit {shown})"
            self.log.warning("kernel %s was %s", self.kernel_id, reason)
            events.record(self.kernel_id, self.kernelspec_name, KILLED,
                          f"{self.kernelspec_name} was {reason}",
                          "free memory in the notebook, or raise memory_limit")

    @property
    def has_process(self) -> bool:
        return self.sandbox is not None

    async def poll(self) -> int | None:
        """None while the kernel runs; else the init's exit status (128+N for signal N)."""
        return self.sandbox.poll() if self.sandbox is not None else 0

    async def wait(self) -> int | None:
        if self.sandbox is None:
            return 0
        code = await self.sandbox.wait()
        self._close_output()
        self.sandbox = None
        return code

    def _close_output(self) -> None:
        """The relay and the pipes it reads, once the kernel is gone."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.sandbox is not None:
            self.sandbox.close_pipes()

    async def send_signal(self, signum: int) -> None:
        """Signal the init; it forwards the signal to the kernel's process group."""
        if self.sandbox is not None:
            self.sandbox.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        # SIGKILL to the init ends the pid namespace: every process inside dies.
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if self.pool_runtime_dir is not None:  # the pooled kernel's copy of the connection file
            remove_tree(self.pool_runtime_dir)
            self.pool_runtime_dir = None
        if self.sandbox is not None and self.sandbox.poll() is not None:
            self._close_output()
        if not restart:
            self.ports_cached = False
            if self.socket_dir is not None:
                remove_socket_dir(self.socket_dir)
                self.socket_dir = None

    def resolve_path(self, path_str: str) -> str | None:
        """LocalProvisioner's answer, except for host paths the kernel can't see."""
        resolved: str | None = super().resolve_path(path_str)
        if resolved is None or self.spec is None:
            return resolved
        if not visible_in_sandbox(resolved, self.spec, str(self.cwd or os.getcwd())):
            return None
        return resolved

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        info["pid"] = self.sandbox_pid
        info["pgid"] = None  # the kernel's process group lives in its own pid namespace
        info["kernelspec_options"] = dict(self.kernelspec_options)
        info["pooled"] = self.pooled
        info["pool_waiting"] = waiting_in_this_process()
        usage = getattr(self.sandbox.cgroup if self.sandbox else None, "usage", None)
        if usage is not None:
            info["cgroup_usage"] = usage()
        if self.spec is not None:
            info["sandbox"] = {"network": self.spec.network,
                               "memory_limit_bytes": self.spec.memory_bytes,
                               "pids_limit": self.spec.pids_limit,
                               "cpu_limit": self.spec.cpu_limit}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.sandbox_pid = provisioner_info["pid"]
        self.kernelspec_options = dict(provisioner_info.get("kernelspec_options", {}))
