"""``egress-guard policy from-opencode`` and ``egress-guard doctor``: argparse wiring.

Exit codes as elsewhere: 0 ok, 1 (doctor) an error was found, 2 unreadable or invalid
input (opencode.json, policy, arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from egress_guard.opencode import doctor as doc
from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.contacts import parse_url
from egress_guard.opencode.jsonc import ConfigError
from egress_guard.opencode.policygen import generate
from egress_guard.policy import (
    PolicyError,
    load_catalog,
    load_policy,
    load_policy_text,
    load_preset,
)
from egress_guard.policy.writer import comment_safe

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2


def _fail(command: str, message: str) -> int:
    print(f"egress-guard {command}: {message}", file=sys.stderr)
    return EXIT_ERROR


def cmd_from_opencode(args: argparse.Namespace) -> int:
    for url in args.remote_config:
        ep, _unresolved, problem = parse_url(url)
        if ep is None:
            return _fail(
                "policy from-opencode",
                f"--remote-config {url!r}: {problem or 'substitutions are not resolved here'}",
            )
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    gen = generate(cfg, load_catalog(), args.config, args.remote_config)
    try:  # never hand out a policy that does not load
        load_policy_text(gen.text, args.output or "<stdout>")
    except PolicyError as e:
        print(
            "egress-guard policy from-opencode: the generated policy does not load (a bug):",
            file=sys.stderr,
        )
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    if args.output:
        tmp = f"{args.output}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(gen.text)
            os.replace(tmp, args.output)
        except OSError as e:
            return _fail("policy from-opencode", f"cannot write {args.output}: {e.strerror or e}")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(gen.text)
    for w in gen.warnings:
        print(f"warning: {comment_safe(w)}", file=sys.stderr)
    for n in gen.notes:
        print(f"note: {comment_safe(n)}", file=sys.stderr)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    if doc.parse_proxy_url(args.proxy_url) is None:
        return _fail("doctor", f"--proxy-url {args.proxy_url!r} is not a proxy URL")
    env = dict(os.environ)
    discovered: list[str] | None = None
    places: list[str] = []
    try:
        if args.config:
            cfg: OpenCodeConfig | None = load_config(args.config)
        else:
            docs, places = doc.discover(env, Path.cwd())
            discovered = [d.file for d in docs]
            cfg = OpenCodeConfig.merged(docs) if docs else None
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    policy = load_policy(args.policy) if args.policy else load_preset("minimal")
    findings = doc.diagnose(
        doc.DoctorInput(
            cfg=cfg,
            env=env,
            policy=policy,
            catalog=load_catalog(),
            policy_label=f"the policy {args.policy}"
            if args.policy
            else "the built-in minimal preset",
            proxy_url=args.proxy_url,
            inspect=args.inspect,
            discovered=discovered,
            checked_places=places,
        )
    )
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for line in doc.render_text(findings):
            print(line)
    return EXIT_FOUND if any(f.severity == "error" for f in findings) else EXIT_OK


def add_opencode_parsers(sub: Any) -> None:
    """Register ``policy from-opencode`` and ``doctor`` on the top-level subparsers."""
    pol = sub.add_parser("policy", help="policy tools: derive a policy from opencode.json")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    fo = psub.add_parser(
        "from-opencode",
        help="the policy an opencode.json / opencode.jsonc needs (exit 2 if it is invalid)",
    )
    fo.add_argument("config", metavar="opencode.json")
    fo.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default stdout)")
    fo.add_argument(
        "--remote-config",
        metavar="URL",
        action="append",
        default=[],
        help="the URL given to `opencode auth login <url>` (its /.well-known/opencode is "
        "fetched at start-up); repeatable",
    )
    fo.set_defaults(func=cmd_from_opencode)

    d = sub.add_parser(
        "doctor",
        help="check opencode.json and the environment for settings that defeat the guard",
    )
    d.add_argument(
        "config",
        nargs="?",
        metavar="opencode.json",
        help="config to check (default: the files OpenCode would merge from here)",
    )
    d.add_argument(
        "--policy", metavar="FILE", help="policy file (default: built-in minimal preset)"
    )
    d.add_argument(
        "--proxy-url",
        default=doc.DEFAULT_PROXY_URL,
        metavar="URL",
        help=f"the guard's address as clients use it (default {doc.DEFAULT_PROXY_URL})",
    )
    d.add_argument(
        "--inspect", action="store_true", help="the guard runs with --inspect (TLS interception)"
    )
    d.add_argument("--json", action="store_true", help="print a JSON array of findings")
    d.set_defaults(func=cmd_doctor)
