"""Start the real ``egress-guard run`` (a real mitmproxy) as a child process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from support.ports import free_port
from support.procfs import tcp_ports

BIN_DIR = Path(sys.executable).parent
EGRESS_GUARD = str(BIN_DIR / "egress-guard")


def wait_listening(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy did not listen on {host}:{port} in {timeout}s:\n{log.read_text()}")


def whole_lines(path: Path) -> list[str]:
    """The lines of a file another process appends to, without a last line that is not
    whole yet (no newline): every record the audit writer finishes ends in one."""
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


class ProxyProcess:
    """One egress-guard process. ``argv`` replaces the command for wrappers (mitmdump)."""

    def __init__(
        self,
        workdir: Path,
        policy: str | Callable[[int], str] | None,
        extra_args: list[str] | None = None,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        audit: bool = True,
        launcher: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.policy_path = workdir / "policy.yaml"
        if callable(policy):
            policy = policy(self.port)  # a policy that needs to know the proxy's own port
        if policy is not None:
            self.policy_path.write_text(policy)
        self.audit_path = workdir / "audit.log"
        #: one CA for the whole test session: generating a key per proxy costs ~0.5 s
        self.confdir = Path(os.environ.get("EG_TEST_CONFDIR") or workdir / "conf")
        self.log_path = workdir / "proxy.log"
        if argv is None:
            argv = [
                *(launcher or [EGRESS_GUARD]),
                "run",
                "--listen",
                f"{self.host}:{self.port}",
                "--confdir",
                str(self.confdir),
            ]
            if policy is not None:
                argv += ["--policy", str(self.policy_path)]
            if audit:
                argv += ["--audit-log", str(self.audit_path), "--audit-fsync", "always"]
            argv += extra_args or []
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        wait_listening(self.host, self.port, self.proc, self.log_path)
        self._wait_probe_closed()
        return self

    def _wait_probe_closed(self, timeout: float = 5.0) -> None:
        """Return once the proxy has closed the readiness probe's connection, so a test
        starts from a proxy holding no client connection (its descriptor count is then
        a baseline). Under a launcher the pid is not the proxy's: nothing to wait for."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                held = tcp_ports(self.proc.pid)
            except OSError:
                return  # exited: the next request will say so
            if not any(local == self.port and remote for local, remote in held):
                return
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def audit(self, event: str | None = "decision") -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        out = []
        for line in whole_lines(self.audit_path):
            if not line.strip():
                continue
            rec = json.loads(line)
            if event is None or rec.get("event") == event:
                out.append(rec)
        return out

    def wait_audit(
        self, pred: Any, timeout: float = 10.0, event: str | None = "decision", count: int = 1
    ) -> list[dict[str, Any]]:
        """Audit records satisfying ``pred``, once there are at least ``count`` of them
        or ``timeout`` has passed (writes are asynchronous; poll briefly)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.audit(event) if pred(r)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def replace_policy(self, text: str, timeout: float = 10.0) -> None:
        """Swap the policy file atomically, send SIGHUP as an operator would after an
        edit (rather than wait for the file watcher's next poll: test_reload tests the
        watcher itself), and wait until the proxy has loaded it."""
        loads = len(self.audit("policy_loaded"))
        tmp = self.policy_path.with_name("next.yaml")
        tmp.write_text(text)
        os.replace(tmp, self.policy_path)
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while len(self.audit("policy_loaded")) == loads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.audit("policy_loaded")[-1]["result"] == "ok"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


ProxyFactory = Callable[..., ProxyProcess]


#: what ``ca export`` printed, by confdir and CA file version: each export starts Python and
#: imports mitmproxy (about a second), and a session's proxies share one confdir, so one CA
_EXPORTED: dict[tuple[Path, int | None], bytes] = {}


def exported_ca(p: ProxyProcess) -> bytes:
    """``p``'s interception CA certificate (PEM), as the real ``egress-guard ca export``
    prints it for an operator."""
    ca_key = p.confdir / "mitmproxy-ca.pem"
    key = (p.confdir, ca_key.stat().st_mtime_ns if ca_key.exists() else None)
    if key not in _EXPORTED:
        _EXPORTED[key] = subprocess.run(
            [EGRESS_GUARD, "ca", "export", "--confdir", str(p.confdir)],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    return _EXPORTED[key]


def guard_ca(p: ProxyProcess, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client TLS context that trusts ``p``'s interception CA (``exported_ca``), for
    talking through an inspected tunnel."""
    pem = exported_ca(p)
    path = p.workdir / "guard-ca.pem"
    path.write_bytes(pem)
    ctx = ssl.create_default_context(cafile=str(path))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def inspect_client(p: ProxyProcess) -> httpx.Client:
    """An httpx client through ``p`` that trusts its interception CA."""
    return httpx.Client(proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20)
