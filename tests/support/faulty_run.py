"""Run egress-guard with a fault injected into one engine method (EG_FAULT=method).

The method raises for any target containing "fault" (or always, for check_sni), which is
how a bug in the engine would look to the addon. The proxy must block, not carry on.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from egress_guard.engine import decide

method = os.environ["EG_FAULT"]
original = getattr(decide.Engine, method)


def faulty(self: Any, *args: Any, **kwargs: Any) -> Any:
    if method == "check_sni" or any("fault" in str(a) for a in args):
        raise RuntimeError(f"injected fault in {method}")
    return original(self, *args, **kwargs)


setattr(decide.Engine, method, faulty)

from egress_guard.cli.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
