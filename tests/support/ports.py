"""Listening ports for processes the tests start, chosen so nothing else can take them.

The usual trick (bind port 0, close, hand the number to a child) leaves a window in
which the kernel can give the same number to someone else: as the local port of an
outgoing connection (a probe can then connect to itself) or to another ``bind(0)``
listener (the test then talks to the wrong server). Both draw from the ephemeral range,
so ports are drawn from below it: only another explicit bind can collide, and that
is checked.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOW = 10000


def _ephemeral_low() -> int:
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and outside the kernel's ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(_LOW, high) if high > _LOW else 0
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError(f"no free port on {host} in {_LOW}..{high}")
