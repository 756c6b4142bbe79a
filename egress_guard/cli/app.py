"""The ``egress-guard`` command line (the console script's entry point).

Exit codes are part of the interface, for scripts and CI: 0 success / all allowed,
1 something was blocked or found wrong, 2 usage or policy errors (``cli/exits.py``).
The parser is ``cli/parser.py``; each command lives in its own module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from egress_guard.cli.exits import EXIT_ERROR, EXIT_INTERRUPTED
from egress_guard.cli.parser import build_parser
from egress_guard.policy import PolicyError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
