"""``egress-guard run``: its flags, its sinks, and start-up checks.

The embedded mitmproxy itself is built in master.py, imported only when the proxy runs,
so ``validate``, ``check`` and the other commands start without loading mitmproxy.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL
from egress_guard.engine.models import DEFAULT_MAX_MODEL_BODY
from egress_guard.normalize import NormalizationError, parse_authority
from egress_guard.policy import PolicyError, load_policy
from egress_guard.proxy.bodybudget import (
    DEFAULT_HELD_BODY_MIN_RATE,
    DEFAULT_MAX_HELD_BODIES,
    HELD_BODY_GRACE,
)
from egress_guard.proxy.settings import RunSettings
from egress_guard.proxy.upstream_trust import UpstreamCAError, upstream_ca_bundle
from egress_guard.sinks.audit import (
    DEFAULT_BACKUPS,
    DEFAULT_MAX_BYTES,
    DEFAULT_QUEUE_SIZE,
    FSYNC_POLICIES,
    AuditLog,
)
from egress_guard.sinks.console import Console
from egress_guard.sinks.events import Sink
from egress_guard.sinks.logsafe import SafeFormatter, escape
from egress_guard.sinks.metrics import Metrics

if TYPE_CHECKING:
    from egress_guard.proxy.master import Companion

log = logging.getLogger("egress_guard")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_CONFDIR = "~/.egress-guard"
DEFAULT_IDLE_TIMEOUT = 600
#: how long a stop (SIGTERM, SIGINT) waits for open connections before closing them;
#: under Kubernetes' default 30 s grace period and Compose's 10 s, so the close records
#: are written before the container is killed
DEFAULT_DRAIN_TIMEOUT = 8
#: after the drain, how long the audit log may take to write what is still queued (a
#: failing write is retried until then); normally a few milliseconds
AUDIT_SHUTDOWN_TIMEOUT = 10.0


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _seconds(text: str) -> int:
    return _whole_number(text, 0)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def listen_address(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` for --listen and --metrics; host must be an address,
    not a name. A bare port (``--metrics 9090``) is on loopback: listening on every
    interface is a choice to write out, never a default."""
    if text.isdigit() and text.isascii():
        text = f"127.0.0.1:{text}"
    try:
        host, port = parse_authority(text)
    except NormalizationError as e:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: {e}") from None
    if host.ip is None and host.value != "localhost":
        raise argparse.ArgumentTypeError(f"{text!r}: listen on an IP address, not a name")
    return (str(host.ip) if host.ip is not None else "127.0.0.1", port)


def add_run_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="run the proxy (default: minimal preset on 127.0.0.1:8080)")
    add_run_options(r)
    r.set_defaults(func=cmd_run)


def add_run_options(r: argparse.ArgumentParser) -> None:
    """``run``'s flags, which ``sandbox`` takes too."""
    r.add_argument(
        "--policy", metavar="FILE", help="policy file (default: built-in minimal preset)"
    )
    r.add_argument(
        "--listen",
        type=listen_address,
        default=DEFAULT_LISTEN,
        metavar="[HOST:]PORT",
        help=f"proxy listen address (default {DEFAULT_LISTEN}; a bare port is on 127.0.0.1)",
    )
    r.add_argument("--mode", choices=("enforce", "audit"), help="override the policy's mode")
    r.add_argument(
        "--inspect",
        action="store_true",
        help="intercept TLS for destinations that declare methods, paths or models",
    )
    r.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        metavar="DIR",
        help=f"where the interception CA lives (default {DEFAULT_CONFDIR})",
    )
    r.add_argument(
        "--upstream-proxy",
        metavar="URL",
        help="send all traffic through a parent proxy, e.g. http://proxy.corp:3128",
    )
    r.add_argument(
        "--transparent",
        action="store_true",
        help="take connections redirected to --listen (iptables/nftables REDIRECT on a "
        "gateway or in a sidecar's pod) instead of proxy requests: each is decided by "
        "its TLS SNI or HTTP Host on its original port, and must have been sent to an "
        "address of that name (docs/operators-guide.md)",
    )
    trust = r.add_mutually_exclusive_group()
    trust.add_argument(
        "--upstream-ca",
        action="append",
        default=[],
        metavar="FILE",
        help="CA certificates (PEM) trusted for upstream TLS (inspect mode, https:// "
        "upstream proxy) in addition to the public roots; may be repeated",
    )
    trust.add_argument(
        "--upstream-ca-only",
        action="append",
        default=[],
        metavar="FILE",
        help="trust only these CA certificates (PEM) for upstream TLS, not the public "
        "roots; may be repeated",
    )
    r.add_argument(
        "--audit-log",
        default="-",
        metavar="FILE|-",
        help="audit log (JSON Lines, hash-chained); '-' is standard output (default)",
    )
    r.add_argument(
        "--audit-fsync",
        choices=FSYNC_POLICIES,
        default="interval",
        help="when the audit log is fsynced (default: interval, every second)",
    )
    r.add_argument(
        "--audit-max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help=f"rotate the audit log at this size, 0 never (default {DEFAULT_MAX_BYTES})",
    )
    r.add_argument(
        "--audit-backups",
        type=int,
        default=DEFAULT_BACKUPS,
        metavar="N",
        help=f"rotated audit files to keep (default {DEFAULT_BACKUPS})",
    )
    r.add_argument(
        "--audit-queue-size",
        type=_positive_int,
        default=DEFAULT_QUEUE_SIZE,
        metavar="N",
        help="records waiting for the audit writer; when full, requests wait for room "
        f"(they are never forwarded unrecorded, nor records dropped) (default "
        f"{DEFAULT_QUEUE_SIZE})",
    )
    r.add_argument(
        "--metrics",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus /metrics, /healthz and the status page here "
        "(e.g. 127.0.0.1:9090; a bare port is on 127.0.0.1)",
    )
    r.add_argument(
        "--idle-timeout",
        type=_positive_int,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection (client and upstream) after this long without traffic "
        f"(default {DEFAULT_IDLE_TIMEOUT}); covers stalled upstreams and slow-loris clients",
    )
    r.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, stop accepting and let open connections finish for up "
        f"to this long, then close them and write their close records (default "
        f"{DEFAULT_DRAIN_TIMEOUT}; keep it under the container's stop grace period; a "
        "second signal stops at once)",
    )
    r.add_argument(
        "--max-model-body",
        type=_positive_int,
        default=DEFAULT_MAX_MODEL_BODY,
        metavar="BYTES",
        help="inspect mode: the largest request body kept whole to read the model it asks "
        f"for (default {DEFAULT_MAX_MODEL_BODY}); larger ones, and ones of unknown length, "
        "are refused on destinations with models",
    )
    r.add_argument(
        "--max-held-bodies",
        type=_positive_int,
        default=DEFAULT_MAX_HELD_BODIES,
        metavar="BYTES",
        help="the request bodies held whole to read their models, all clients together "
        f"(default {DEFAULT_MAX_HELD_BODIES}, by declared length); one client address may "
        "hold a quarter of it (at least one --max-model-body body); a body that does not "
        "fit is refused with 503 (buffer_budget)",
    )
    r.add_argument(
        "--held-body-min-rate",
        type=_non_negative_int,
        default=DEFAULT_HELD_BODY_MIN_RATE,
        metavar="BYTES_PER_S",
        help="when a body does not fit, held bodies older than "
        f"{HELD_BODY_GRACE:g} s that arrived slower than this (a head alone, a trickle) "
        f"are evicted: their connection is closed (default {DEFAULT_HELD_BODY_MIN_RATE}; "
        "0: never)",
    )
    r.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop for the proxy: uvloop (faster; the default when installed) "
        "or Python's own asyncio loop (default auto)",
    )
    r.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also a line on stderr for each allowed decision (blocks always get one); "
        "log mitmproxy's own messages and egress-guard's debug messages",
    )


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(verbose: bool) -> None:
    # Every line on stderr goes through SafeFormatter: log lines quote what clients send
    # (and so do mitmproxy's), and a terminal must never receive their control
    # characters raw, nor a forged line (egress_guard/sinks/logsafe.py).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for h in logging.getLogger().handlers:  # basicConfig adds none if some were there
        if (
            isinstance(h, logging.StreamHandler)
            and h.stream in (sys.stderr, sys.stdout)
            and not isinstance(h.formatter, SafeFormatter)
        ):
            h.setFormatter(SafeFormatter(LOG_FORMAT))
    if verbose:
        logging.getLogger("egress_guard").setLevel(logging.DEBUG)
    else:
        # mitmproxy logs every client connect/disconnect at INFO; that is the audit log's job.
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)


def make_sinks(args: argparse.Namespace) -> list[Sink]:
    sinks: list[Sink] = []
    if args.audit_log:
        path = args.audit_log if args.audit_log == "-" else os.path.abspath(args.audit_log)
        sinks.append(
            AuditLog(
                path,
                fsync=args.audit_fsync,
                max_bytes=args.audit_max_bytes,
                backups=args.audit_backups,
                queue_size=args.audit_queue_size,
            )
        )
    if args.metrics is not None:
        metrics = Metrics()
        for sink in sinks:
            if isinstance(sink, AuditLog):
                metrics.track_audit(sink)
        sinks.append(metrics)
    # one human line per block on stderr (per decision with --verbose), after the audit
    # log: a request the audit log could not record is refused, and shown as refused
    sinks.append(Console(allows=bool(getattr(args, "verbose", False))))
    return sinks


def run_settings(args: argparse.Namespace, upstream_ca_bundle: str | None) -> RunSettings:
    """The proxy's settings from ``run``'s flags: the proxy layer never sees argparse."""
    return RunSettings(
        listen=args.listen,
        confdir=args.confdir,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        max_model_body=args.max_model_body,
        max_held_bodies=args.max_held_bodies,
        held_body_min_rate=args.held_body_min_rate,
        policy=args.policy,
        mode=args.mode,
        inspect=bool(args.inspect),
        upstream_proxy=args.upstream_proxy,
        upstream_ca_bundle=upstream_ca_bundle,
        metrics=args.metrics,
        transparent=bool(getattr(args, "transparent", False)),
    )


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the proxy runs on; None means asyncio's own.

    uvloop (libuv underneath) runs mitmproxy's per-connection machinery - tasks, futures,
    transports - which is most of what a tunnel costs, with less CPU than asyncio's
    selector loop: 2 to 17 % less per tunnel across this machine's bench runs
    (bench/EXPERIMENTS.md). Nothing in the guard depends on which loop runs: both are
    driven through public asyncio API only.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                "egress-guard: --event-loop uvloop: uvloop is not installed "
                "(pip install uvloop, or use --event-loop asyncio)"
            ) from None
        return None
    return uvloop.new_event_loop


def unavailable_listeners(args: argparse.Namespace) -> str | None:
    """Why an address ``run`` must listen on cannot be bound, or None.

    Asked before anything starts: otherwise the proxy logs "listening", audits a start-up,
    and then fails inside mitmproxy with a traceback or a hint naming a mitmproxy flag
    egress-guard does not have. Each socket is bound as the listeners bind theirs
    (SO_REUSEADDR, so a port in TIME_WAIT is not "in use") and held until all are
    checked, so ``--metrics`` on the ``--listen`` port is caught too.
    """
    held: list[socket.socket] = []
    try:
        wanted = [("--listen", args.listen), ("--metrics", args.metrics)]
        for flag, (host, port) in [(f, a) for f, a in wanted if a is not None]:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(1)
            except OSError as e:
                where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
                if e.errno == errno.EADDRINUSE:
                    why = "the address is already in use (another proxy or exporter?)"
                else:
                    why = str(e.strerror or e)
                return f"{flag} {where}: cannot listen: {why}; choose another with {flag}"
        return None
    finally:
        for sock in held:
            sock.close()


Prepared = tuple[RunSettings, list[Sink], Callable[[], asyncio.AbstractEventLoop] | None]


def cmd_run(args: argparse.Namespace) -> int:
    prepared = prepare_run(args)
    if isinstance(prepared, int):
        return prepared
    return serve_until_stopped(*prepared)


def prepare_run(args: argparse.Namespace) -> Prepared | int:
    """Everything ``run`` checks and builds before the proxy starts, or an exit code
    (its message printed)."""
    _setup_logging(args.verbose)
    factory = loop_factory(args.event_loop)
    if args.policy:
        # Read once here, before anything starts: a broken file is one message (its
        # file:line and hint), with no start-up logged or audited and no "policy loaded"
        # for the built-in preset that mitmproxy's option rollback would otherwise load.
        # The proxy reads it again itself (proxy/reload.py), and refuses to start if it
        # broke in between.
        try:
            load_policy(args.policy)
        except PolicyError as e:
            print(escape(e.render(), keep_newlines=True), file=sys.stderr)
            return EXIT_ERROR
    if getattr(args, "transparent", False) and args.upstream_proxy:
        print(
            "egress-guard: --transparent cannot be combined with --upstream-proxy "
            "(redirected connections are decided on the addresses the guard resolves)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if (problem := unavailable_listeners(args)) is not None:
        print(f"egress-guard: {problem}", file=sys.stderr)
        return EXIT_ERROR
    try:
        Path(os.path.expanduser(args.confdir)).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        confdir = escape(args.confdir)
        print(f"egress-guard: --confdir {confdir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        bundle = upstream_ca_bundle(args.confdir, args.upstream_ca, args.upstream_ca_only)
    except UpstreamCAError as e:
        print(f"egress-guard: {e}", file=sys.stderr)
        return EXIT_ERROR
    settings = run_settings(args, bundle)
    sinks = make_sinks(args)
    audit = [s for s in sinks if isinstance(s, AuditLog)]
    if any(not s.healthy for s in audit):
        # Refuse to start rather than run a proxy that refuses every connection.
        error = escape(str(audit[0].last_error))
        print(f"egress-guard: cannot write the audit log: {error}", file=sys.stderr)
        for s in audit:
            s.shutdown(timeout=1)
        return EXIT_ERROR
    return settings, sinks, factory


def serve_until_stopped(
    settings: RunSettings,
    sinks: list[Sink],
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
    companion: Companion | None = None,
) -> int:
    """Run the proxy until it stops; then every queued audit record is written."""
    # Imported here: mitmproxy takes about a second to import, and only `run` needs it.
    from egress_guard.proxy.master import serve

    audit = [s for s in sinks if isinstance(s, AuditLog)]
    complete = False
    rc = EXIT_ERROR
    try:
        log.debug("egress-guard: event loop %s", "asyncio" if factory is None else "uvloop")
        rc = asyncio.run(serve(settings, sinks, companion), loop_factory=factory)
    finally:
        # Graceful stop: the guard has queued the close records of what was still open
        # (its done hook); every queued audit record reaches the file before we exit.
        complete = all([s.shutdown(AUDIT_SHUTDOWN_TIMEOUT) for s in audit])
    if not complete and rc == 0:
        print("egress-guard: audit records were lost at shutdown (see above)", file=sys.stderr)
        return EXIT_FAIL
    return rc
