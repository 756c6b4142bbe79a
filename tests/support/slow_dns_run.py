"""Run egress-guard with a name server that is slow for names under ``slow.test``.

``socket.getaddrinfo`` (what the guard's resolver threads call) waits EG_DNS_DELAY
seconds for those names and answers 127.0.0.1; every other name goes to the real
function. Nothing is sent to any name server: ``.test`` names never leave the process.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

delay = float(os.environ.get("EG_DNS_DELAY", "4"))
real = socket.getaddrinfo


def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(host, str) and host.endswith(".slow.test"):
        time.sleep(delay)
        return real("127.0.0.1", port, *args, **kwargs)
    return real(host, port, *args, **kwargs)


socket.getaddrinfo = getaddrinfo

from egress_guard.cli.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
