"""egress-guard: an egress policy proxy for AI coding agents, built on mitmproxy."""

__version__ = "0.1.0"
