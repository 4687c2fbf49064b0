"""network = "egress": outbound internet through pasta, the host and the LAN out of reach.

The sandbox gets its own network namespace. The GrandChild adds one
"prohibit" rule per denied range there while it still holds CAP_NET_ADMIN
(csrc/nsnet.c) and hands the namespace to us; we attach pasta (Debian's
`passt` package) to it. pasta turns each connection the sandbox makes into a
socket of its own on the host, so the rules must deny everything the host
reaches that the sandbox must not: the host's own addresses, link-local
(cloud metadata), multicast and by default the private ranges. pasta runs
with --no-map-gw (else the gateway address is the host's loopback) and no
port forwarding either way (its default forwards the host's bound ports
into the sandbox's loopback). DNS: /etc/resolv.conf inside names
DNS_FORWARDER, which pasta answers by asking the host's resolver.

pasta lives as long as the sandbox: stopped when the init is reaped, killed
by PR_SET_PDEATHSIG (set by setpriv before pasta runs) when the server dies.
"""

from __future__ import annotations

import array
import asyncio
import functools
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .errors import SandboxError
from .handshake import readable

if TYPE_CHECKING:
    from .process import SandboxProcess

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_EGRESS_DENY = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                       "fc00::/7")
# Denied whatever egress_deny says: the host's loopback (pasta would map it
# only through options we never give; the rule says it twice), link-local
# (cloud metadata at 169.254.169.254, fe80::/10), "this network", multicast
# and broadcast (LAN discovery services).
ALWAYS_DENIED = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                 "255.255.255.255/32", "::1/128", "fe80::/10", "ff00::/8")
# Where the sandbox sends DNS (UDP port 53 only, exempt from the link-local
# rule): pasta forwards it to the host's first resolver. rootless podman
# uses the same address.
DNS_FORWARDER = "169.254.1.1"
RESOLV_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "egress-resolv.conf")
READY_TIMEOUT = 10.0
# pasta joins the sandbox's user namespace and makes a mount, uts and ipc
# namespace of its own there, possibly after the sandbox has written its
# counters: these kinds get room for it. The kernel can't use that room: it
# would need CAP_SYS_ADMIN in a user namespace, and it may make none.
PASTA_NAMESPACES = {"max_mnt_namespaces": 8, "max_uts_namespaces": 8,
                    "max_ipc_namespaces": 8}
PASTA_FIX = "install passt (apt-get install passt), which provides pasta"


def parse_deny(value: object) -> tuple[str, ...]:
    """egress_deny: a list of CIDR ranges, each checked; normalised strings."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise SandboxError(f"egress_deny must be a list of address ranges, not {value!r}")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=True)))
        except ValueError as e:
            raise SandboxError(f"egress_deny entry {item!r} is not an address range ({e}); "
                               "write it as e.g. 10.0.0.0/8 or fc00::/7") from None
    return tuple(out)


def host_addresses() -> list[Network]:
    """Every address of the server's network namespace, as /32 and /128."""
    found: set[Network] = set()
    last = None
    try:
        with open("/proc/net/fib_trie") as f:
            for line in f:
                text = line.strip()
                if text.startswith("|--"):
                    last = text[3:].strip()
                elif text.startswith("/32 host LOCAL") and last:
                    found.add(ipaddress.ip_network(last + "/32"))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(ipaddress.ip_network(
                    str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))) + "/128"))
    except OSError:
        pass
    return sorted(found, key=lambda n: (n.version, n))


def denied_networks(egress_deny: Iterable[str]) -> list[Network]:
    nets = {ipaddress.ip_network(n) for n in (*ALWAYS_DENIED, *egress_deny)}
    nets.update(host_addresses())
    return sorted(nets, key=lambda n: (n.version, n))


def pasta_path() -> str | None:
    return shutil.which("pasta")


def pasta_version() -> str | None:
    """The installed passt package's version (pasta --version says "unknown")."""
    try:
        with open("/var/lib/dpkg/status") as f:
            block = f.read().split("\n\nPackage: passt\n", 1)
    except OSError:
        return None
    if len(block) < 2:
        return None
    for line in block[1].split("\n\n", 1)[0].splitlines():
        if line.startswith("Version: "):
            return line.removeprefix("Version: ")
    return None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


def egress_counters(counters: Mapping[str, int]) -> dict[str, int]:
    """The sandbox's user counters with room for pasta's own namespaces."""
    return {**counters, **{name: max(counters.get(name, value), value)
                           for name, value in PASTA_NAMESPACES.items()}}


def _range(n: Network) -> tuple[int, bytes, int]:
    return (socket.AF_INET if n.version == 4 else socket.AF_INET6, n.network_address.packed,
            n.prefixlen)


class Egress:
    """One sandbox's egress network: its rules (for C), its pasta, and their end."""

    def __init__(self, spec_deny: Iterable[str], strict: bool, stack: ExitStack, *,
                 before_exec: bool = True) -> None:
        self.pasta = pasta_path()
        if self.pasta is None:
            message = "network 'egress' needs pasta, which is not installed"
            if strict:
                raise SandboxError(message, step="network", hint=PASTA_FIX)
            _warn_once(f"{message}: kernels get loopback only ({PASTA_FIX})")
        self.parent_sock, self.child_sock = socket.socketpair(socket.AF_UNIX,
                                                              socket.SOCK_SEQPACKET)
        self.proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self.deny = denied_networks(spec_deny)
        self.before_exec = before_exec
        # our end and the pasta are dropped if the spawn fails; the
        # GrandChild's end goes in any case once the clone has its copy
        stack.callback(self.close_child_end)
        stack.push(lambda failed, *_: self.stop() if failed else None)

    def plan_fields(self, sock_index: int) -> dict[str, Any]:
        """Plan's net_* fields: the rules, and where the GrandChild's end of our
        socket is among the fds passed with the plan (see passed_fd)."""
        return {"net_deny": [_range(n) for n in self.deny],
                "net_dns": [_range(ipaddress.ip_network(DNS_FORWARDER))],
                "net_sock": sock_index if self.pasta else -1, "net_wait": self.before_exec}

    def passed_fd(self) -> list[int]:
        """The fd to pass with the plan (none without a stack)."""
        return [self.child_sock.fileno()] if self.pasta else []

    def close_child_end(self) -> None:
        self.child_sock.close()

    def begin(self) -> None:
        """Attach pasta as soon as the GrandChild hands its namespaces over,
        while the rest of the sandbox is still being set up."""
        if self.pasta:
            self._task = asyncio.ensure_future(self._attach_or_abort())

    async def _attach_or_abort(self) -> None:
        try:
            await self._attach()
        except BaseException:
            self.parent_sock.close()  # EOF: the GrandChild fails, the handshake ends
            raise

    async def _receive_namespaces(self) -> tuple[int, int] | None:
        """The GrandChild's network and user namespaces; None when it failed before
        sending them (its own error record says why)."""
        await readable(self.parent_sock.fileno())
        fds = array.array("i")
        _, anc, _, _ = self.parent_sock.recvmsg(1, socket.CMSG_LEN(2 * fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return None
        return fds[0], fds[1]

    def _argv(self, netns: int, userns: int, pid_fd: int) -> list[str]:
        assert self.pasta is not None
        argv = [self.pasta, "--foreground", "--quiet", "--config-net", "--no-map-gw",
                "-t", "none", "-u", "none", "-T", "none", "-U", "none",
                "--dns-forward", DNS_FORWARDER, "--no-netns-quit",
                "--netns", f"/proc/self/fd/{netns}", "--userns", f"/proc/self/fd/{userns}",
                "--pid", f"/proc/self/fd/{pid_fd}"]
        if os.geteuid() == 0:
            # pasta drops to "nobody" by default, which clears the parent-death
            # signal; it drops its capabilities all the same.
            argv += ["--runas", f"{os.geteuid()}:{os.getegid()}"]
        # PR_SET_PDEATHSIG before pasta runs; a server that died before that
        # call is no longer our parent, and the shell then stops there.
        return [shutil.which("setpriv") or "/usr/bin/setpriv", "--pdeathsig", "KILL", "--",
                "/bin/sh", "-c",
                'test "$PPID" = "$1" || exit 1; shift; exec "$@"', "sh", str(os.getpid()),
                *argv]

    def _start(self, netns: int, userns: int, ready_w: int, log: int) -> subprocess.Popen[bytes]:
        """A plain child, not an asyncio one: pasta lives as long as the kernel, across
        the event loops a client may run it from. Forked from this thread, which the
        parent-death signal watches."""
        return subprocess.Popen(self._argv(netns, userns, ready_w), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log,
                                pass_fds=(netns, userns, ready_w), start_new_session=True)

    async def _attach(self) -> None:
        namespaces = await self._receive_namespaces()
        if namespaces is None:
            return
        netns, userns = namespaces
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        log = os.memfd_create("pasta-stderr", os.MFD_CLOEXEC)
        try:
            self.proc = self._start(netns, userns, ready_w, log)
        finally:
            for fd in (netns, userns, ready_w):
                os.close(fd)
        try:
            # pasta writes its pid once the namespace's interface is configured
            await asyncio.wait_for(readable(ready_r), READY_TIMEOUT)
            pid = os.read(ready_r, 64)
            if not pid:
                err = os.pread(log, 4096, 0).decode(errors="replace")
                err = " ".join(line for line in err.splitlines() if "syslog" not in line)
                raise SandboxError("pasta could not attach to the sandbox: "
                                   f"{err.strip() or 'no output'}", step="network",
                                   hint=PASTA_FIX)
        finally:
            os.close(ready_r)
            os.close(log)
        if self.before_exec:
            self.parent_sock.send(b"1")  # the GrandChild may let the command run

    def reraise(self) -> None:
        """The sandbox failed: pasta's own error, when that is why."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            if error is not None:
                raise error

    async def attach(self, sandbox: SandboxProcess) -> None:
        """Wait for pasta to be up; it stops when the sandbox's init is reaped."""
        if self._task is not None:
            await self._task
            if self.proc is None:
                raise SandboxError("the sandbox did not hand over its network namespace",
                                   step="network")
        self.parent_sock.close()
        sandbox.add_exit_callback(lambda _: self.stop())

    def stop(self) -> None:
        """Kill pasta (it never outlives its sandbox); safe to call twice."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.parent_sock.close()
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
