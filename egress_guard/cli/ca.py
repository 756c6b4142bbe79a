"""``egress-guard ca export``: the interception CA certificate, for NODE_EXTRA_CA_CERTS.

Inspect mode terminates TLS with a CA that mitmproxy keeps in the confdir. Clients must
trust it; OpenCode (Bun) reads extra CAs from ``NODE_EXTRA_CA_CERTS``. Exporting creates
the CA when the confdir has none yet, so the file can be handed out before the first run;
its subject names egress-guard, not mitmproxy (egress_guard/proxy/castore.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.cli.run import DEFAULT_CONFDIR
from egress_guard.sinks.logsafe import escape


def ca_certificate_pem(confdir: str) -> bytes:
    """The confdir's CA certificate, made (named for egress-guard) if there is none."""
    # imported here: it imports mitmproxy (about a second), and only this command needs it
    from egress_guard.proxy.castore import ensure_ca

    return ensure_ca(confdir).pem


def cmd_ca_export(args: argparse.Namespace) -> int:
    """Exit 2 with one line when the confdir or the output cannot be written."""
    try:
        pem = ca_certificate_pem(args.confdir)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        print(
            f"egress-guard ca export: cannot use confdir {escape(args.confdir)}: {why}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    if args.output in (None, "-"):
        sys.stdout.write(pem.decode())
        return EXIT_OK
    try:
        Path(args.output).write_bytes(pem)
    except OSError as e:
        out = escape(args.output)
        print(f"egress-guard ca export: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    out = escape(args.output)
    print(f"wrote {out}; trust it with NODE_EXTRA_CA_CERTS={out}", file=sys.stderr)
    return EXIT_OK


def add_ca_parser(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the interception CA used in inspect mode")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    export = ca_sub.add_parser("export", help="write the CA certificate (PEM)")
    export.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        metavar="DIR",
        help=f"the proxy's confdir (default {DEFAULT_CONFDIR})",
    )
    export.add_argument("-o", "--output", metavar="FILE", help="output file (default stdout)")
    export.set_defaults(func=cmd_ca_export)
