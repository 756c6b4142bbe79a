"""A private network namespace for adversarial tests, and a trap that sees every connection.

The adversarial suite sends forbidden destinations through the real proxy. To prove that
nothing reached them, the destinations must exist: a listener on 169.254.169.254, on
10.0.0.1, on ``64:ff9b::7f00:1``... Those addresses cannot be bound in the machine's own
network namespace (and must never be contacted there), so each test module gets a fresh
namespace of its own (``ip netns add``): only ``lo``, no route anywhere else, every
forbidden address added to ``lo``. Whatever the proxy does, no packet can leave it.

The test process's *main thread* enters the namespace for the duration of a module
(``NetNS.enter``); threads and child processes started meanwhile (upstream servers, the
proxy, curl) inherit it. ``Trap`` listens on the wildcard addresses of a few ports, so a
connection to *any* address of the namespace on those ports is accepted and recorded
with the local address it reached.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_COUNTER = itertools.count()

#: Addresses put on ``lo`` inside the namespace. The forbidden ones are all classes the
#: guard must refuse; 10.200.0.0/24 holds the allowed upstreams (allowed by
#: ``network.allow_cidrs`` in the test policies).
FORBIDDEN_V4 = (
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.170.2",
    "100.100.100.200",
    "100.64.0.1",
    "192.0.0.192",
)
FORBIDDEN_V6 = (
    "fd00:ec2::254",
    "fc00::1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "::7f00:1",
    # Teredo: server 65.54.227.120, client 127.0.0.1 (obfuscated: ~127.0.0.1)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
)
ALLOWED_V4 = tuple(f"10.200.0.{i}" for i in range(10, 20))


def netns_available() -> str | None:
    """None when namespaces can be made here; otherwise why not (for a skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if not hasattr(os, "setns"):
        return "os.setns is not available"
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left behind by earlier runs whose process is gone (a killed
    pytest cannot run its finalizers)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("egadv") or "x" not in name:
            continue
        pid = name[len("egadv") :].split("x", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


class NetNS:
    """A named network namespace with only loopback, the forbidden and allowed test
    addresses on it. ``with ns.enter():`` switches the calling thread into it."""

    def __init__(self) -> None:
        self.name = f"egadv{os.getpid()}x{next(_COUNTER)}"
        self.path = f"/run/netns/{self.name}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self._ip("link", "set", "lo", "up")
            for a in (*FORBIDDEN_V4, *ALLOWED_V4):
                self._ip("addr", "add", f"{a}/32", "dev", "lo")
            for a in FORBIDDEN_V6:
                self._ip("-6", "addr", "add", f"{a}/128", "dev", "lo")
        except BaseException:
            self.destroy()
            raise

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    @contextlib.contextmanager
    def enter(self) -> Iterator[NetNS]:
        """Move the calling thread into the namespace; back out on exit."""
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            os.setns(target, os.CLONE_NEWNET)
            try:
                yield self
            finally:
                os.setns(orig, os.CLONE_NEWNET)
        finally:
            os.close(target)
            os.close(orig)

    def destroy(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def addresses(self) -> str:
        out = subprocess.run(["ip", "-n", self.name, "-br", "addr"], capture_output=True, text=True)
        return out.stdout


def assert_isolated() -> None:
    """The calling thread must be in a namespace that reaches nothing outside: a route to
    a public address would mean we are in the machine's namespace."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent by connect()
    except OSError:
        return
    finally:
        s.close()
    raise AssertionError("not inside an isolated network namespace: refusing to run")


@dataclass
class Hit:
    local: tuple[str, int]
    peer: tuple[str, int]
    first_bytes: bytes
    at: float


@dataclass
class Trap:
    """Wildcard listeners (0.0.0.0 and ::) on ``ports``: records every connection to any
    address of the namespace on those ports. Call from inside the namespace."""

    ports: tuple[int, ...]
    hits: list[Hit] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _socks: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Trap:
        for port in self.ports:
            v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            v4.bind(("0.0.0.0", port))
            v4.listen(128)
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.bind(("::", port))
            v6.listen(128)
            self._socks += [v4, v6]
        self._thread = threading.Thread(target=self._loop, daemon=True, name="trap")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.2)
            for s in ready:
                try:
                    conn, peer = s.accept()
                except OSError:
                    continue
                conn.settimeout(0.3)
                try:
                    first = conn.recv(4096)
                except OSError:
                    first = b""
                with self._lock:
                    self.hits.append(Hit(conn.getsockname()[:2], peer[:2], first, time.monotonic()))
                conn.close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.hits)

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for s in self._socks:
            s.close()


class FaultUpstream:
    """A plain-HTTP upstream that misbehaves on request: the path picks the fault.

    ``/ok``         200 with a short body
    ``/close-mid``  promises 100000 bytes, sends 1000, closes (FIN)
    ``/reset``      promises 100000 bytes, sends 1000, resets (RST)
    ``/stall``      promises 100000 bytes, sends 100, then nothing until released
    ``/slow``       20 chunks of 1000 bytes, 0.2 s apart (an in-flight download)
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.paths: list[str] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fault-upstream")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while True:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line = buf.split(b"\r\n", 1)[0].decode("latin-1")
                parts = line.split(" ")
                path = parts[1] if len(parts) > 1 else "/"
                if "://" in path:
                    path = "/" + path.split("://", 1)[1].partition("/")[2]
                with self._lock:
                    self.paths.append(path)
                if not self._respond(conn, path):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _respond(self, conn: socket.socket, path: str) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        if path.startswith("/close-mid"):
            conn.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
            time.sleep(0.1)
            return False
        if path.startswith("/reset"):
            conn.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path.startswith("/stall"):
            conn.sendall(head + b"Content-Length: 100000\r\n\r\n" + b"x" * 100)
            self.release.wait(30)
            return False
        if path.startswith("/slow"):
            conn.sendall(head + b"Content-Length: 20000\r\n\r\n")
            for _ in range(20):
                time.sleep(0.2)
                conn.sendall(b"y" * 1000)
            return True
        body = b"fault-upstream ok\n"
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return True

    def close(self) -> None:
        self.release.set()
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
