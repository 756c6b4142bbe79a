"""The public entry for an existing mitmproxy: ``mitmdump -s egress_guard/addon.py``.

mitmdump loads this file by path as a top-level module and looks for ``addons``; the
guard itself lives in ``egress_guard.proxy`` (egress_guard/proxy/guard.py lists its
addons; the embedded ``egress-guard run`` adds the same ones). Absolute imports only: a
relative one fails when loaded by path.
"""

from __future__ import annotations

from egress_guard.proxy.guard import guard_addons

__all__ = ["guard_addons"]

# Imported as part of the package (``egress_guard.addon``) it builds nothing.
if __name__ != "egress_guard.addon":
    addons = guard_addons()[1]
