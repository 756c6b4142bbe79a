"""Run egress-guard with a fault injected into one engine rule (EG_FAULT=rule).

The rule is one of those ``Engine.decide`` calls (a name in egress_guard/engine/decide.py:
decide_name, decide_addresses, check_sni, ...). It raises for any target containing
"fault" (or always, for check_sni), which is how a bug in the engine would look to the
addon. The proxy must block, not carry on.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from egress_guard.engine import decide
from egress_guard.engine.compiled import Compiled

method = os.environ["EG_FAULT"]
original = getattr(decide, method)


def faulty(*args: Any, **kwargs: Any) -> Any:
    facts = args[1:] if args and isinstance(args[0], Compiled) else args
    if method == "check_sni" or any("fault" in str(a) for a in facts):
        raise RuntimeError(f"injected fault in {method}")
    return original(*args, **kwargs)


setattr(decide, method, faulty)

from egress_guard.cli.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
