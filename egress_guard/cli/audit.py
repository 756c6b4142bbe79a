"""``egress-guard audit verify|summary|learn``: argument parsing and printing;
the readers themselves are egress_guard/sinks/audit/{read,verify,summary,learn}.py.

verify   recompute the hash chain over the files in chain order (a rotated set given in
         any order, e.g. ``audit.log*``, is put oldest first). Exit 0 intact, 1 at the first
         break, naming file:line and what happened: edited, deleted, reordered, truncated
         or invalid. A chain whose first lines were rotated away is accepted with a note
         (``--require-start`` makes that an error). Deleting lines from the very end of
         the newest file cannot be seen by any unkeyed chain: compare the printed head hash
         with one recorded elsewhere.
summary  per destination and per blocked host (--by user: per proxy user): counts by
         decision, bytes, first/last seen.
learn    the smallest version-1 policy allowing the host:port targets of allowed and
         plainly not-listed decisions, using catalog entries (``- use:``) where one covers
         the target; never a denied or non-public target (docs/audit-log.md).

Exit codes as elsewhere: 0 ok, 1 something found wrong, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.policy import PolicyError, load_catalog, load_policy
from egress_guard.policy.writer import write_atomically
from egress_guard.sinks.audit.learn import Source, learn
from egress_guard.sinks.audit.read import ReadStats, iter_records, order_files
from egress_guard.sinks.audit.summary import VIEWS, render_summary, summarize
from egress_guard.sinks.audit.verify import verify

# -- commands ------------------------------------------------------------------------------


def _files(args: argparse.Namespace) -> list[str]:
    files = order_files(args.files)
    if files != list(args.files):
        print(f"reading in rotation order: {' '.join(files)}", file=sys.stderr)
    return files


def cmd_verify(args: argparse.Namespace) -> int:
    files = _files(args)
    try:
        res = verify(files, require_start=args.require_start)
    except OSError as e:
        print(f"egress-guard audit verify: {e}", file=sys.stderr)
        return EXIT_ERROR
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    if res.broken is not None:
        print(f"FAIL {res.broken}")
        return EXIT_FAIL
    if res.lines == 0:
        print("OK: no lines")
        return EXIT_OK
    print(
        f"OK: {res.lines} lines in {len(files)} file(s), seq {res.first_seq}..{res.last_seq}, "
        f"head {res.head}"
    )
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    stats = ReadStats()
    try:
        s = summarize(iter_records(_files(args), stats))
    except OSError as e:
        print(f"egress-guard audit summary: {e}", file=sys.stderr)
        return EXIT_ERROR
    if stats.unreadable:
        print(f"warning: {stats.unreadable} unreadable line(s) skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        sys.stdout.write(render_summary(s, by=args.by))
    return EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    files = _files(args)
    stats = ReadStats()
    source: Source | None = None
    if args.policy:
        try:
            source = Source(load_policy(args.policy), args.policy)
        except PolicyError as e:
            print(e.render(), file=sys.stderr)
            return EXIT_ERROR
    try:
        learned = learn(iter_records(files, stats), load_catalog(), files, source)
    except OSError as e:
        print(f"egress-guard audit learn: {e}", file=sys.stderr)
        return EXIT_ERROR
    except PolicyError as e:  # never hand out a policy that does not load
        print(
            "egress-guard audit learn: the learned policy does not load (a bug):", file=sys.stderr
        )
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    if stats.unreadable:
        print(f"warning: {stats.unreadable} unreadable line(s) skipped", file=sys.stderr)
    if learned.left_out:
        print(
            f"note: {learned.left_out} left-out target(s) and reason(s), never learned: "
            "listed at the end of the policy",
            file=sys.stderr,
        )
    if args.output:
        write_atomically(args.output, learned.text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(learned.text)
    return EXIT_OK


def add_audit_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="verify, summarise or learn a policy from audit logs")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    files_help = (
        "audit log files in chain order (a rotated set such as audit.log* is sorted); - for stdin"
    )

    v = asub.add_parser("verify", help="check the hash chain; exit 1 naming the first broken line")
    v.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    v.add_argument(
        "--require-start",
        action="store_true",
        help="fail unless the chain starts at its first line ever written (seq 1)",
    )
    v.set_defaults(func=cmd_verify)

    s = asub.add_parser("summary", help="per destination and per blocked host counts")
    s.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    s.add_argument("--json", action="store_true", help="JSON instead of tables (holds every view)")
    s.add_argument(
        "--by",
        choices=VIEWS,
        default="destination",
        help="one row per destination (and per blocked host), or per proxy user (clients.auth)",
    )
    s.set_defaults(func=cmd_summary)

    lp = asub.add_parser(
        "learn",
        help="a minimal policy allowing the host:port targets seen (never denied or "
        "non-public ones)",
    )
    lp.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    lp.add_argument(
        "--policy",
        metavar="FILE",
        help="the policy the log was written under: its deny, network and clients sections "
        "are copied, and nothing its deny rules deny is learned",
    )
    lp.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default stdout)")
    lp.set_defaults(func=cmd_learn)
