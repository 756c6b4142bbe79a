"""What the embedded proxy needs to know to start, as one typed value.

The proxy layer used to read ``egress-guard run``'s argparse Namespace directly, so a
renamed flag broke the proxy at start-up rather than in mypy, and the proxy could not be
started without building a command line. ``cli/run.py`` builds this from its flags.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    """The options of one proxy run (their meaning: ``egress-guard run --help``)."""

    listen: tuple[str, int]
    confdir: str
    idle_timeout: int
    drain_timeout: int
    max_model_body: int
    max_held_bodies: int
    held_body_min_rate: int
    #: None: the built-in minimal preset
    policy: str | None = None
    #: "enforce", "audit", or None for the policy's own mode
    mode: str | None = None
    inspect: bool = False
    upstream_proxy: str | None = None
    #: the PEM bundle written for --upstream-ca / --upstream-ca-only, None: public roots
    upstream_ca_bundle: str | None = None
    #: where /metrics and /healthz are served, None: not at all
    metrics: tuple[str, int] | None = None
    #: connections arrive redirected (iptables/nftables REDIRECT), without CONNECT
    transparent: bool = False
