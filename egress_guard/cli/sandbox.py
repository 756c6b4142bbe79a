"""``egress-guard sandbox [run options] -- COMMAND``: the guard as the only way out.

COMMAND runs in a network namespace of its own with loopback alone; no route leaves it
(IPv4 and IPv6: the default routes point at ``lo``). A forked child makes the namespace
(as root; without root, inside a user namespace of its own, where the kernel allows
that), sets it up, makes the guard's listening sockets in it and hands them to the guard
over a socket pair (a socket stays in the namespace it was made in), then execs COMMAND.
The guard keeps its own connections in the host's namespace:

- ``--listen``'s port on the sandbox's 127.0.0.1: the proxy HTTPS_PROXY names;
- DIRECT_PORT on 127.0.0.1 and ::1 there: nftables redirects every other TCP connection
  to it, so one that ignores the proxy (``curl --noproxy '*'``, a raw socket) reaches
  the guard, is decided by its name and original address, and recorded
  (proxy/sandbox_relay.py, engine/rules/direct.py);
- UDP and everything else is rejected; there is no resolver, so a DNS query (UDP or
  TCP) carries nothing out: a TCP one is caught like any connection and refused.

The guard itself listens on an ephemeral port of the host's loopback, which the sandbox
cannot reach. Why this shape: docs/decisions.md, "egress-guard sandbox".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_guard.cli.exits import EXIT_ERROR
from egress_guard.cli.run import add_run_options, prepare_run, serve_until_stopped
from egress_guard.policy import PolicyError, load_policy
from egress_guard.sinks.logsafe import escape

if TYPE_CHECKING:
    from egress_guard.proxy.state import GuardState

#: set to 1: use a user namespace even as root (the path taken without root; for tests)
USERNS_ENV = "EGRESS_GUARD_SANDBOX_USERNS"
#: the audit log's default, in the confdir (standard output is COMMAND's)
SANDBOX_AUDIT_LOG = "sandbox-audit.jsonl"
#: where caught connections arrive inside the sandbox (as service meshes' 15001)
DIRECT_PORT = 15001
_PR_SET_PDEATHSIG = 1
_GUARD_START_TIMEOUT = 15.0


def add_sandbox_parser(sub: Any) -> None:
    s = sub.add_parser(
        "sandbox",
        help="run COMMAND in a network namespace whose only way out is the guard",
        description="Start the guard (the options of `run`) and run COMMAND in a new "
        "network namespace whose only reachable endpoint is the guard: HTTPS_PROXY points "
        "at it, and connections that ignore the proxy are caught and decided too. "
        "--listen is the proxy's address inside the sandbox; the audit log is "
        f"CONFDIR/{SANDBOX_AUDIT_LOG} unless --audit-log says otherwise (standard output "
        "is COMMAND's). Exit status: COMMAND's. Needs root.",
    )
    add_run_options(s)
    # stdout is COMMAND's: the audit log goes to a file unless `--audit-log -` is asked for
    s.set_defaults(audit_log=None)
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    s.set_defaults(func=cmd_sandbox)


def _fail(message: str) -> int:
    print(f"egress-guard sandbox: {message}", file=sys.stderr)
    return EXIT_ERROR


def missing_prerequisite() -> str | None:
    """Why a sandbox cannot be made here, in plain words, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install {package})"
    return None


def nft_rules(proxy_port: int) -> str:
    return f"""table inet egress_guard_sandbox {{
  chain nat_out {{
    type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.1 tcp dport {{ {proxy_port}, {DIRECT_PORT} }} return
    ip6 daddr ::1 tcp dport {DIRECT_PORT} return
    meta l4proto tcp redirect to :{DIRECT_PORT}
  }}
  chain filter_out {{
    type filter hook output priority 0; policy drop;
    oifname "lo" meta l4proto tcp accept
    meta l4proto udp reject
    meta l4proto tcp reject with tcp reset
  }}
}}
"""


def _setup_namespace(proxy_port: int) -> None:
    """In the child, after unshare: loopback up, default routes to it, the redirect."""
    steps: list[tuple[list[str], str | None, bool]] = [
        (["ip", "link", "set", "lo", "up"], None, True),
        # src: without it a connection to a global address leaves from 0.0.0.0 (lo's
        # 127.0.0.1 has host scope), and the catch-all's answers never reach it
        (["ip", "-4", "route", "add", "default", "dev", "lo", "src", "127.0.0.1"], None, True),
        (["ip", "-6", "route", "add", "default", "dev", "lo"], None, False),
        (["nft", "-f", "-"], nft_rules(proxy_port), True),
    ]
    for argv, stdin, needed in steps:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
        if r.returncode != 0 and needed:
            raise OSError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def _enter_namespaces(user: bool) -> None:
    """A new network namespace; with ``user``, inside a new user namespace too, where
    this process is root (uid and gid mapped to the caller's)."""
    if not user:
        os.unshare(os.CLONE_NEWNET)
        return
    uid, gid = os.getuid(), os.getgid()
    try:
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
    except PermissionError:
        raise OSError(
            "unprivileged user namespaces are not allowed on this machine "
            "(kernel.unprivileged_userns_clone, user.max_user_namespaces or an AppArmor "
            "restriction); run egress-guard sandbox as root"
        ) from None
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _child(
    chan: socket.socket, proxy_port: int, user: bool, argv: Sequence[str], env: dict[str, str]
) -> None:
    """The forked child: makes the namespace and the guard's listeners in it, hands the
    listeners to the guard over ``chan``, waits for "go", and execs COMMAND. Never
    returns."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:
            os._exit(EXIT_ERROR)
        _enter_namespaces(user)
        _setup_namespace(proxy_port)
        socks = _inside_listeners(proxy_port)
        socket.send_fds(chan, [b"ok"], [s.fileno() for s in socks])
        for sock in socks:
            sock.close()
    except Exception as e:  # reported by the parent in one line
        chan.sendall(f"cannot make the namespace: {e}".encode()[:4000])
        os._exit(EXIT_ERROR)
    if chan.recv(2) != b"go":
        os._exit(EXIT_ERROR)  # the guard did not start: COMMAND never runs unguarded
    chan.close()
    try:
        os.execvpe(argv[0], list(argv), env)
    except OSError as e:
        print(f"egress-guard sandbox: {escape(argv[0])}: {e.strerror or e}", file=sys.stderr)
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)


def _listener(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _inside_listeners(proxy_port: int) -> list[socket.socket]:
    """The proxy's listener first, then the catch-all's."""
    socks = [
        _listener(socket.AF_INET, "127.0.0.1", proxy_port),
        _listener(socket.AF_INET, "127.0.0.1", DIRECT_PORT),
    ]
    with contextlib.suppress(OSError):  # no IPv6 in this kernel: nothing to catch there
        socks.append(_listener(socket.AF_INET6, "::1", DIRECT_PORT))
    return socks


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sandbox_env(
    base: dict[str, str], proxy_port: int, ca: Path | None, bundle: Path | None
) -> dict[str, str]:
    env = dict(base)
    url = f"http://127.0.0.1:{proxy_port}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env[name] = url
    for name in ("ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    if ca is not None and bundle is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(ca)
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            env[name] = str(bundle)
    return env


def _ca_bundle(confdir: str) -> tuple[Path, Path]:
    """--inspect: the guard's CA, and a bundle of it with the system roots."""
    from egress_guard.proxy.castore import ensure_ca

    ca = ensure_ca(confdir)
    roots = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    system = Path(roots).read_text() if Path(roots).is_file() else ""
    bundle = ca.cert_path.parent / "sandbox-ca-bundle.pem"
    bundle.write_text(system.rstrip("\n") + "\n" + ca.cert_path.read_text())
    return ca.cert_path, bundle


async def _wait_for_guard(port: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _GUARD_START_TIMEOUT
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        w.close()
        return


def _exit_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def cmd_sandbox(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        return _fail("no command: egress-guard sandbox [options] -- COMMAND [ARGS...]")
    if args.policy:  # a broken file is its own message, before anything else is asked
        try:
            load_policy(args.policy)
        except PolicyError as e:
            print(escape(e.render(), keep_newlines=True), file=sys.stderr)
            return EXIT_ERROR
    if (problem := missing_prerequisite()) is not None:
        return _fail(problem)
    if args.audit_log is None:
        args.audit_log = os.path.join(os.path.expanduser(args.confdir), SANDBOX_AUDIT_LOG)
    inside_host, proxy_port = args.listen
    if inside_host != "127.0.0.1" or proxy_port == DIRECT_PORT:
        return _fail(
            f"--listen: the proxy inside the sandbox is on 127.0.0.1, not port {DIRECT_PORT}"
        )
    ca = bundle = None
    if args.inspect:
        try:
            ca, bundle = _ca_bundle(args.confdir)
        except OSError as e:
            return _fail(f"the interception CA in {escape(args.confdir)}: {e.strerror or e}")
    env = sandbox_env(dict(os.environ), proxy_port, ca, bundle)
    guard_port = _free_loopback_port()
    args.listen = ("127.0.0.1", guard_port)
    user = os.geteuid() != 0 or os.environ.get(USERNS_ENV) == "1"
    chan, child_chan = socket.socketpair()
    # forked before anything starts a thread (the audit writer, mitmproxy)
    pid = os.fork()
    if pid == 0:
        chan.close()
        _child(child_chan, proxy_port, user, argv, env)
    child_chan.close()
    state: dict[str, int] = {}
    try:
        answer, fds, _, _ = socket.recv_fds(chan, 4096, 4)
        socks = [socket.socket(fileno=fd) for fd in fds]
        if answer != b"ok" or len(socks) < 2:
            return _fail(escape(answer.decode("utf-8", "replace") or "the child died"))
        prepared = prepare_run(args)
        if isinstance(prepared, int):
            return prepared
        proxy_socks, direct_socks = socks[:1], socks[1:]

        async def companion(guard: GuardState, stop: Callable[[], None]) -> None:
            from egress_guard.proxy.sandbox_relay import SandboxRelay

            loop = asyncio.get_running_loop()
            relay = SandboxRelay(guard, ("127.0.0.1", guard_port))
            serving = loop.create_task(relay.serve(proxy_socks, direct_socks))
            exited = loop.create_future()
            pidfd = os.pidfd_open(pid)

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            _forward_signals(loop, pid)
            try:
                await _wait_for_guard(guard_port)
                chan.sendall(b"go")
                await exited
                _, status = os.waitpid(pid, 0)
                state["status"] = status
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

        guard_rc = serve_until_stopped(*prepared, companion=companion)
    finally:
        chan.close()  # the child, if still waiting, exits without running COMMAND
        if "status" not in state:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    if "status" not in state:
        return guard_rc or EXIT_ERROR
    child_rc = _exit_status(state["status"])
    return child_rc if guard_rc == 0 else guard_rc


def _forward_signals(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """SIGTERM and SIGINT go to COMMAND, which decides when it ends (the guard
    stops when it has). A Ctrl-C on the terminal reaches COMMAND itself (same process
    group), so SIGINT is forwarded only when it did not come from the terminal."""

    def forward(sig: int) -> None:
        if sig == signal.SIGINT:
            with contextlib.suppress(OSError):
                if os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp():
                    return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, forward, sig)
