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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.policy import PolicyError, load_catalog, load_policy
from egress_guard.policy.writer import write_atomically
from egress_guard.sinks.audit.learn import Source, learn
from egress_guard.sinks.audit.read import ReadStats, Record, iter_records, order_files
from egress_guard.sinks.audit.summary import VIEWS, render_summary, summarize
from egress_guard.sinks.audit.verify import verify
from egress_guard.sinks.logsafe import escape


def _os_error(e: OSError) -> str:
    """``FILE: reason`` in one escaped line (no errno prefix, no traceback)."""
    name = f"{escape(str(e.filename))}: " if e.filename else ""
    return f"{name}{e.strerror or e}"


# -- commands ------------------------------------------------------------------------------


def _files(args: argparse.Namespace) -> list[str]:
    files = order_files(args.files)
    if files != list(args.files):
        print(f"reading in rotation order: {' '.join(files)}", file=sys.stderr)
    return files


@dataclass
class _Seen:
    """What the readers met: audit records, and lines that are not (counted, skipped)."""

    records: int = 0
    other: int = 0
    stats: ReadStats | None = None

    def skipped(self) -> int:
        return self.other + (self.stats.unreadable if self.stats else 0)


def _audit_records(files: Sequence[str], seen: _Seen) -> Iterator[Record]:
    """The audit records of ``files``: JSON objects with the ``event`` every record
    carries (``seq`` is not required: records cut out of a log, or written by hand to
    test a policy, are read too). Any other JSON (a config file, another program's log)
    is skipped and counted, so a wrong file is reported as one rather than summarised
    as "1 events"."""
    seen.stats = ReadStats()
    for rec in iter_records(files, seen.stats):
        if isinstance(rec.obj.get("event"), str):
            seen.records += 1
            yield rec
        else:
            seen.other += 1


def _not_an_audit_log(command: str, files: Sequence[str], seen: _Seen) -> bool:
    """True (and says so) when the files hold lines but not one audit record."""
    if seen.records or not seen.skipped():
        return False
    names = ", ".join(files)
    print(
        f"egress-guard audit {command}: {escape(names)}: not an egress-guard audit log "
        f"({seen.skipped()} line(s), none of them an audit record)",
        file=sys.stderr,
    )
    return True


def cmd_verify(args: argparse.Namespace) -> int:
    files = _files(args)
    try:
        res = verify(files, require_start=args.require_start)
    except OSError as e:
        print(f"egress-guard audit verify: {_os_error(e)}", file=sys.stderr)
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
    files = _files(args)
    seen = _Seen()
    try:
        s = summarize(_audit_records(files, seen))
    except OSError as e:
        print(f"egress-guard audit summary: {_os_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    if _not_an_audit_log("summary", files, seen):
        return EXIT_ERROR
    if seen.skipped():
        print(f"warning: {seen.skipped()} unreadable line(s) skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        sys.stdout.write(render_summary(s, by=args.by))
    return EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    files = _files(args)
    seen = _Seen()
    source: Source | None = None
    if args.policy:
        try:
            source = Source(load_policy(args.policy), args.policy)
        except PolicyError as e:
            print(e.render(), file=sys.stderr)
            return EXIT_ERROR
    try:
        learned = learn(_audit_records(files, seen), load_catalog(), files, source)
    except OSError as e:
        print(f"egress-guard audit learn: {_os_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    except PolicyError as e:  # never hand out a policy that does not load
        print(
            "egress-guard audit learn: the learned policy does not load (a bug):", file=sys.stderr
        )
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    if _not_an_audit_log("learn", files, seen):
        return EXIT_ERROR
    if seen.skipped():
        print(f"warning: {seen.skipped()} unreadable line(s) skipped", file=sys.stderr)
    if learned.left_out:
        print(
            f"note: {learned.left_out} left-out target(s) and reason(s), never learned: "
            "listed at the end of the policy",
            file=sys.stderr,
        )
    if args.output:
        try:
            write_atomically(args.output, learned.text)
        except OSError as e:
            why = e.strerror or e
            print(
                f"egress-guard audit learn: cannot write {escape(args.output)}: {why}",
                file=sys.stderr,
            )
            return EXIT_ERROR
        print(f"wrote {escape(args.output)}", file=sys.stderr)
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
