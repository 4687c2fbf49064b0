"""network = "egress": outbound internet through pasta; the host, its loopback, the LAN
and cloud metadata out of reach; no pasta outlives its sandbox.

As root the test builds its own "internet": a network namespace joined to the host
by a veth pair (198.51.100.0/24, a documentation range), an HTTP server there, and
two more addresses it answers on through routes the test adds and removes:
169.254.169.254 (a cloud's metadata address) and 10.254.0.1 (the LAN), and a DNS
server for its own names (tests/dns_server.py). Traffic goes only there and to
loopback. Names resolve through pasta's forwarder to the resolver the server's
/etc/resolv.conf names: one test runs the server where that file names the test's
DNS server, the others check that a name resolves inside as it does outside.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsprovisioner import SandboxError, SandboxSpec
from nsprovisioner.egress import pasta_path

from .conftest import execute_ok, run
from .test_network import manager, started, write_spec

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(pasta_path() is None, reason="pasta (passt) not installed")]

INET_HOST = "198.51.100.1"   # the host's end of the veth pair
INET_PEER = "198.51.100.2"   # the "internet" host
METADATA = "169.254.169.254"
LAN = "10.254.0.1"
HTTP_PORT = 8080
INET_NAME = "www.internet.test"  # what the test's DNS server answers for: INET_PEER
TESTS_ROOT = Path(__file__).resolve().parent.parent


def _stat(pid: str) -> tuple[str, str] | None:
    """(comm, ppid) of a process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[1]


def pasta_processes(parent: int | None = None) -> list[int]:
    """pasta (passt.*) and slirp4netns processes whose parent, or parent's parent, is
    `parent` (default: this process)."""
    me = str(os.getpid() if parent is None else parent)
    found = []
    for entry in Path("/proc").iterdir():
        info = _stat(entry.name) if entry.name.isdigit() else None
        if info is None or not info[0].startswith(("passt", "pasta", "slirp4netns")):
            continue
        grandparent = _stat(info[1])
        if info[1] == me or (grandparent is not None and grandparent[1] == me):
            found.append(int(entry.name))
    return found


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test's "internet": a netns with an HTTP server; its name."""
    if os.geteuid() != 0:
        pytest.skip("building the test's internet (a netns and veth pair) needs root")
    name = f"nsp-egress-{os.getpid()}"
    veth = f"nspe{os.getpid() % 100000}"
    www = tmp_path_factory.mktemp("www")
    (www / "hello.txt").write_text("hello from the internet\n")
    (www / "big.bin").write_bytes(os.urandom(1 << 20) * 100)  # 100 MiB
    ip("netns", "add", name)
    server = dns = None
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", "inet0", "netns", name)
        ip("addr", "add", f"{INET_HOST}/24", "dev", veth)
        ip("link", "set", veth, "up")
        for args in (("addr", "add", f"{INET_PEER}/24", "dev", "inet0"),
                     ("addr", "add", f"{METADATA}/32", "dev", "lo"),
                     ("addr", "add", f"{LAN}/32", "dev", "lo"),
                     ("link", "set", "inet0", "up"), ("link", "set", "lo", "up")):
            ip("-n", name, *args)
        ip("route", "add", f"{METADATA}/32", "via", INET_PEER)
        ip("route", "add", f"{LAN}/32", "via", INET_PEER)
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-m", "http.server", "--bind",
             "0.0.0.0", "--directory", str(www), str(HTTP_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dns = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-m", "tests.dns_server", INET_PEER,
             f"{INET_NAME}={INET_PEER}"], cwd=TESTS_ROOT, stdout=subprocess.PIPE, text=True)
        assert dns.stdout is not None and dns.stdout.readline() == "ready\n"
        for _ in range(100):
            try:
                socket.create_connection((INET_PEER, HTTP_PORT), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield name
    finally:
        for process in (server, dns):
            if process is not None:
                process.kill()
                process.wait()
        for route in (METADATA, LAN):
            subprocess.run(["ip", "route", "del", f"{route}/32"], check=False,
                           capture_output=True)
        subprocess.run(["ip", "link", "del", veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def kernels(tmp_path: Path) -> Path:
    kernels = tmp_path / "kernels"
    write_spec(kernels, "egress", "egress")
    write_spec(kernels, "hostnet", "host")
    return kernels


# Probe helpers, run inside: what a connect() met ("connected", "EACCES", ...),
# a URL's text or the error's name, a name's sorted addresses or the error's name.
NET_HELPERS = r"""
import errno, json, socket, urllib.request
def attempt(host, port):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect(socket.getaddrinfo(host, port, s.family, socket.SOCK_STREAM)[0][4])
        return "connected"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
def fetch(url, timeout=5):
    try:
        return urllib.request.urlopen(url, timeout=timeout).read().decode()
    except OSError as e:
        return type(e).__name__
def resolve(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
    except OSError as e:
        return type(e).__name__
"""

PROBE = NET_HELPERS + r"""
print(json.dumps({
    "by_address": fetch("http://INET_PEER:HTTP_PORT/hello.txt"),
    "metadata": attempt("METADATA", HTTP_PORT),
    "lan": attempt("LAN", HTTP_PORT),
    "host_listener": attempt("127.0.0.1", HOST_PORT),
    "jupyter_port": attempt("127.0.0.1", JUPYTER_PORT),
    "host_addresses": {a: attempt(a, HOST_PORT) for a in HOST_ADDRESSES},
    "resolved": resolve(NAME),
}))
"""


def host_addresses() -> list[str]:
    from nsprovisioner.egress import host_addresses as addrs
    return [str(n.network_address) for n in addrs()
            if not n.network_address.is_loopback and not n.network_address.is_link_local]


def outside_resolution(name: str) -> list[str] | str:
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
    except OSError as e:
        return type(e).__name__


def test_egress_reaches_the_internet_and_nothing_of_the_host(internet: str,
                                                              kernels: Path) -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))  # every host address, v4 and v6
    listener.listen()
    host_port = listener.getsockname()[1]
    # an address the host resolves but the sandbox's pasta copies onto its own
    # interface is local inside: it is the sandbox itself, and refuses
    name = "pypi.org"

    async def main() -> dict[str, Any]:
        jupyter = manager(kernels, "hostnet")
        async with started(jupyter):
            km = manager(kernels, "egress")
            async with started(km) as kc:
                assert km.transport == "ipc"
                code = (PROBE.replace("INET_PEER", INET_PEER)
                        .replace("HTTP_PORT", str(HTTP_PORT)).replace("METADATA", METADATA)
                        .replace("LAN", LAN).replace("HOST_PORT", str(host_port))
                        .replace("JUPYTER_PORT", str(jupyter.shell_port))
                        .replace("HOST_ADDRESSES", repr(host_addresses()))
                        .replace("NAME", repr(name)))
                result: dict[str, Any] = json.loads(await execute_ok(kc, code, timeout=60))
                return result

    try:
        result = run(main())
    finally:
        listener.close()
    assert result["by_address"] == "hello from the internet\n"
    assert result["metadata"] == "EACCES"
    assert result["lan"] == "EACCES"
    assert result["host_listener"] == "ECONNREFUSED"  # the sandbox's own loopback
    assert result["jupyter_port"] == "ECONNREFUSED"
    # EACCES: denied; ECONNREFUSED: the address pasta copied onto the sandbox's own
    # interface (the sandbox itself, which listens on nothing)
    assert result["host_addresses"]
    for address, outcome in result["host_addresses"].items():
        assert outcome in ("EACCES", "ECONNREFUSED"), (address, outcome)
    assert result["host_addresses"][INET_HOST] == "EACCES"
    outside = outside_resolution(name)
    if isinstance(outside, str):
        pytest.skip(f"this host resolves no names ({outside}); DNS inside can't be compared")
    assert result["resolved"] == outside
    assert pasta_processes() == []


def test_a_sandbox_denied_nothing_but_the_always_denied_reaches_the_lan(internet: str) -> None:
    spec = SandboxSpec(network="egress", egress_deny=[], seccomp="default")
    code = ("import socket,errno\n"
            "for a in ('LAN', 'METADATA'):\n"
            "    s = socket.socket(); s.settimeout(3)\n"
            "    try: s.connect((a, PORT)); print(a, 'connected')\n"
            "    except OSError as e: print(a, errno.errorcode[e.errno])\n"
            ).replace("LAN", LAN).replace("METADATA", METADATA).replace("PORT", str(HTTP_PORT))
    out = _run_capture(spec, [sys.executable, "-c", code])
    assert f"{LAN} ECONNREFUSED" in out or f"{LAN} connected" in out  # reached the LAN
    assert f"{METADATA} EACCES" in out


BY_NAME = NET_HELPERS + r"""
print(json.dumps({"resolved": resolve(NAME), "fetched": fetch(URL, timeout=10)}))
"""

SPAWN_AND_PRINT = r"""
import sys
from nsprovisioner import SandboxSpec
from tests.test_egress import _run_capture
sys.stdout.write(_run_capture(SandboxSpec(network="egress"), [sys.executable, "-c", sys.argv[1]]))
"""


def test_egress_fetches_by_a_name_the_servers_resolver_answers(internet: str,
                                                                tmp_path: Path) -> None:
    """The sandbox's DNS is pasta's forwarder, which asks the resolver the server's
    /etc/resolv.conf names. Here the server runs in a mount namespace whose
    resolv.conf names the test internet's DNS server: a name only that server
    knows resolves inside, and the kernel fetches by it."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {INET_PEER}\n")
    code = (BY_NAME.replace("NAME", repr(INET_NAME))
            .replace("URL", repr(f"http://{INET_NAME}:{HTTP_PORT}/hello.txt")))
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
         'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"', "sh", str(resolv),
         sys.executable, "-c", SPAWN_AND_PRINT, code],
        check=False, cwd=TESTS_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["resolved"] == [INET_PEER]
    assert result["fetched"] == "hello from the internet\n"
    assert outside_resolution(INET_NAME) != [INET_PEER]  # only the sandbox's resolver knows it
    assert pasta_processes() == []


def _run_capture(spec: SandboxSpec, argv: list[str]) -> str:
    from nsprovisioner.spawn import PIPE, spawn

    async def main() -> str:
        proc = await spawn(spec, argv, stdout=PIPE, stderr=PIPE)
        assert proc.stdout is not None
        out = b""
        while chunk := await _read(proc.stdout.fileno()):
            out += chunk
        await proc.wait()
        proc.close_pipes()
        return out.decode()

    return run(main())


async def _read(fd: int) -> bytes:
    from nsprovisioner.handshake import readable
    await readable(fd)
    return os.read(fd, 65536)


def test_egress_kernel_lifecycle_leaves_no_pasta(kernels: Path) -> None:
    """Restart, the init killed, shutdown: one pasta per live sandbox, none after.
    (Interrupt, the restarter and culling run in the parity tests' "egress" variant:
    test_provisioner.py, test_server.py; server SIGKILL in test_hostile_crash.py.)"""
    async def main() -> None:
        km = manager(kernels, "egress")
        async with started(km) as kc:
            first = pasta_processes()
            assert len(first) == 1
            await km.restart_kernel(now=True)
            await kc.wait_for_ready(timeout=30)
            second = pasta_processes()
            assert len(second) == 1 and second != first
            sandbox = km.provisioner.sandbox  # type: ignore[union-attr]
            sandbox.kill()
            await sandbox.wait()
            assert pasta_processes() == []
            await km.restart_kernel(now=True)  # what the restarter does after a death
            await kc.wait_for_ready(timeout=30)
            assert len(pasta_processes()) == 1
        assert pasta_processes() == []

    run(main())


def test_server_sigkill_takes_pasta_with_it(tmp_path: Path) -> None:
    """The server dies without a word: pasta's parent-death signal ends it."""
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "nsprovisioner"),
                               "run", "--network",
                               "egress", "--", "sleep", "60"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        pastas: list[int] = []
        while not pastas and time.monotonic() < deadline:
            pastas = pasta_processes()
            time.sleep(0.05)
        assert pastas, "pasta never started"
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in pastas) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in pastas)
    finally:
        server.kill()
        server.wait()


def test_egress_without_pasta_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxError, match="apt-get install passt"):
        _run_capture(SandboxSpec(network="egress"), ["/bin/true"])


def test_egress_deny_rejects_what_is_not_a_range() -> None:
    with pytest.raises(SandboxError, match="egress_deny entry '10.0.0.1/8'"):
        SandboxSpec(network="egress", egress_deny=["10.0.0.1/8"])
    assert SandboxSpec(network="egress").egress_deny[0] == "10.0.0.0/8"


def test_egress_without_pasta_not_strict_starts_with_loopback_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    out = _run_capture(SandboxSpec(network="egress", strict=False), [sys.executable, "-c", code])
    assert out.strip() == "['lo']"


NO_INTERNET_PROBE = NET_HELPERS + r"""
import subprocess
undo = subprocess.run(["ip", "rule", "del", "pref", "11"], capture_output=True, text=True)
print(json.dumps({
    "host_listener": attempt("127.0.0.1", PORT),
    "metadata": attempt("169.254.169.254", 80),
    "link_local6": [attempt(f"fe80::1%{n}", 80) for _, n in socket.if_nameindex() if n != "lo"],
    "lan": attempt("10.1.2.3", 80), "ula": attempt("fd12::1", 80),
    "host_addresses": {a: attempt(a, PORT) for a in ADDRESSES},
    "undo_rules": undo.returncode, "resolved": resolve(NAME),
}))
"""


def test_egress_keeps_loopback_link_local_and_lan_out_of_reach_without_root() -> None:
    """Root or not, no test internet needed: the denied ranges fail at once with EACCES,
    the kernel can't remove the rules, and names resolve as they do outside."""
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", 0))
    listener.listen()
    port = listener.getsockname()[1]
    name = "pypi.org"
    code = (NO_INTERNET_PROBE.replace("PORT", str(port)).replace("NAME", repr(name))
            .replace("ADDRESSES", repr(host_addresses())))
    try:
        out = _run_capture(SandboxSpec(network="egress"), [sys.executable, "-c", code])
    finally:
        listener.close()
    result = json.loads(out)
    assert result["host_listener"] == "ECONNREFUSED"  # its own loopback, not the host's
    assert result["metadata"] == "EACCES"
    assert all(outcome == "EACCES" for outcome in result["link_local6"])
    assert result["lan"] == "EACCES" and result["ula"] in ("EACCES", "ENETUNREACH")
    for address, outcome in result["host_addresses"].items():
        assert outcome in ("EACCES", "ECONNREFUSED"), (address, outcome)
    assert result["undo_rules"] != 0  # no CAP_NET_ADMIN inside
    outside = outside_resolution(name)
    if not isinstance(outside, str):
        assert result["resolved"] == outside
    assert pasta_processes() == []


def test_a_pasta_that_fails_is_named_and_nothing_is_left(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "pasta"
    fake.write_text("#!/bin/sh\necho 'Failed to open tap device: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SandboxError, match="pasta could not attach to the sandbox: "
                                           "Failed to open tap device: boom"):
        _run_capture(SandboxSpec(network="egress"), ["/bin/true"])
    assert pasta_processes() == []
