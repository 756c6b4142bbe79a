"""Reference row: a minimal embedded mitmproxy master with no guard, passing tunnels through.

The addons ``egress-guard run`` embeds, minus the guard itself, with ``ignore_hosts .*``:
the difference between this row and egress-guard tunnel mode is what the guard adds; the
difference between this row and bare mitmdump is what dropping mitmdump's other addons
saves. ``python -m bench.minimal_master --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from mitmproxy import options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master


async def _main(port: int, confdir: str) -> None:
    master = Master(options.Options(), with_termlog=False)
    master.addons.add(
        core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig()
    )
    master.options.update(
        listen_host="127.0.0.1",
        listen_port=port,
        confdir=confdir,
        ignore_hosts=[".*"],
        connection_strategy="lazy",
        http2=False,
        http3=False,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    await master.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--confdir", required=True)
    a = ap.parse_args()
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    asyncio.run(_main(a.port, a.confdir))


if __name__ == "__main__":
    main()
