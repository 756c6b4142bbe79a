"""Experiment launcher: ``egress-guard`` with candidate hot-path changes patched in.

Used only by the bench (``python -m bench --experiments``) to measure a proposed change
before anyone edits egress_guard/: ``python -m bench.variants PATCH[,PATCH...] -- run ...``
applies the named patches and then runs the normal CLI with the remaining arguments.
Nothing here is imported by egress_guard or the tests.

Patches measured here and since adopted in egress_guard (so gone from this file): the
cached hook dispatch (master.HookTable), cached metric label children, gc.freeze with a
larger generation-0 threshold, mitmproxy's per-message type check switched off, the
audit writer that events no longer wake, and uvloop as the event loop (now a run flag,
measured by the ``x_asyncio_loop`` experiment). ``-O`` / PYTHONOPTIMIZE is not a patch: the bench
sets it in the environment (configs ``x_optimize``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: name -> function that patches the guard in this process before the CLI starts
PATCHES: dict[str, Callable[[], None]] = {}


def _copying_relay() -> None:
    """The spliced relay as it was before it read into a shared buffer: a plain protocol
    that gets a new bytes object (an allocation and a copy) per read. Kept to measure
    what the buffered relay saves (experiment ``x_copying_relay``)."""
    import asyncio

    from egress_guard.proxy.patches import splice

    class CopyingRelay(asyncio.Protocol):
        def __init__(self, d):  # type: ignore[no-untyped-def]
            self.d = d

        def data_received(self, data):  # type: ignore[no-untyped-def]
            splice._relay(self.d, data)

        eof_received = splice._Relay.eof_received
        connection_lost = splice._Relay.connection_lost
        pause_writing = splice._Relay.pause_writing
        resume_writing = splice._Relay.resume_writing

    splice._Relay = CopyingRelay  # type: ignore[misc,assignment]


PATCHES["copying_relay"] = _copying_relay


def main() -> int:
    argv = sys.argv[1:]
    names = [n for n in argv[0].split(",") if n] if argv and argv[0] != "--" else []
    rest = argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        print(f"bench.variants: unknown patch(es): {', '.join(unknown)}", file=sys.stderr)
        return 2
    for n in names:
        PATCHES[n]()
    from egress_guard.cli.app import main as cli_main

    sys.argv = ["egress-guard", *rest]
    return int(cli_main() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
