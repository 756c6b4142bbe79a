"""``egress-guard doctor``: check opencode.json and the environment for settings that
defeat the guard. The checks are ``egress_guard.opencode.doctor`` and its ``doctor_*``
modules; this is the wiring."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.cli.shared import fail, policy_or_minimal
from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.doctor import diagnose
from egress_guard.opencode.doctor_probe import ProbeResult, probe, probe_findings
from egress_guard.opencode.doctor_report import (
    DEFAULT_PROXY_URL,
    SEVERITY_ORDER,
    DoctorInput,
    render_text,
)
from egress_guard.opencode.doctor_values import discover, parse_proxy_url
from egress_guard.opencode.jsonc import ConfigError
from egress_guard.policy import load_catalog


def _probe(proxy_url: str) -> ProbeResult | None:
    target = parse_proxy_url(proxy_url)
    if target is None or target.scheme != "http":
        return None
    return probe(proxy_url, target.host, target.port)


def cmd_doctor(args: argparse.Namespace) -> int:
    if parse_proxy_url(args.proxy_url) is None:
        return fail("doctor", f"--proxy-url {args.proxy_url!r} is not a proxy URL")
    env = dict(os.environ)
    discovered: list[str] | None = None
    places: list[str] = []
    try:
        if args.config:
            cfg: OpenCodeConfig | None = load_config(args.config)
        else:
            docs, places = discover(env, Path.cwd())
            discovered = [d.file for d in docs]
            cfg = OpenCodeConfig.merged(docs) if docs else None
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    inp = DoctorInput(
        cfg=cfg,
        env=env,
        policy=policy_or_minimal(args.policy),
        catalog=load_catalog(),
        policy_label=f"the policy {args.policy}" if args.policy else "the built-in minimal preset",
        proxy_url=args.proxy_url,
        inspect=args.inspect,
        discovered=discovered,
        checked_places=places,
    )
    findings = diagnose(inp)
    if not args.no_probe:
        findings = sorted(
            [*findings, *probe_findings(inp, _probe(args.proxy_url))],
            key=lambda f: SEVERITY_ORDER[f.severity],
        )
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for line in render_text(findings):
            print(line)
    return EXIT_FAIL if any(f.severity == "error" for f in findings) else EXIT_OK


def add_doctor_parser(sub: Any) -> None:
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
        default=DEFAULT_PROXY_URL,
        metavar="URL",
        help=f"the guard's address as clients use it (default {DEFAULT_PROXY_URL})",
    )
    d.add_argument(
        "--inspect", action="store_true", help="the guard runs with --inspect (TLS interception)"
    )
    d.add_argument("--json", action="store_true", help="print a JSON array of findings")
    d.add_argument(
        "--no-probe",
        action="store_true",
        help="check the configuration only; do not ask the proxy URL whether an "
        "egress-guard answers there (and which policy it runs)",
    )
    d.set_defaults(func=cmd_doctor)
