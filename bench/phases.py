"""Where a tunnel's c=1 latency goes: ``python -m bench.phases [--configs a,b] [--n 300]``.

Times, on the client, CONNECT -> 200, the TLS handshake through the tunnel, and the GET,
for each configuration, interleaved in rounds; prints medians. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics as st
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.certs import SNI, make_certs
from bench.configs import CONFIGS, EXPERIMENTS, Env
from bench.procs import Child
from bench.run import start_upstream


async def _one(t: loadgen.Target) -> tuple[float, float, float]:
    assert t.proxy is not None
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(*t.proxy)
    auth = f"{t.connect_host}:{t.upstream_port}".encode()
    w.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (auth, auth))
    await r.readuntil(b"\r\n\r\n")
    t1 = time.perf_counter()
    await w.start_tls(t.ssl, server_hostname=SNI)
    t2 = time.perf_counter()
    w.write(
        b"GET / HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
        % (SNI.encode(), t.upstream_port)
    )
    await r.readuntil(b"\r\n\r\n")
    await r.read()
    t3 = time.perf_counter()
    w.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(w.wait_closed(), 2)
    return t1 - t0, t2 - t1, t3 - t2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="mitmdump,minimal,guard_tunnel")
    ap.add_argument("--n", type=int, default=300, help="tunnels per configuration")
    a = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="egress-guard-phases-"))
    wd.chmod(0o711)
    upstream: Child | None = None
    kids: dict[str, tuple[loadgen.Target, Child]] = {}
    try:
        ca, leaf, key = make_certs(wd / "certs")
        upstream, _ = start_upstream(wd, leaf, key, False)
        env = Env(wd, upstream.port, ca)
        for k in a.configs.split(","):
            cfg = next(c for c in CONFIGS + EXPERIMENTS if c.key == k)
            assert cfg.build is not None and cfg.extra_ca is None, f"{k}: tunnel configs only"
            child = cfg.build(env).start()
            kids[k] = (
                loadgen.Target(
                    upstream.port,
                    loadgen.client_context(str(ca)),
                    ("127.0.0.1", child.port),
                    cfg.connect_host,
                ),
                child,
            )

        async def run() -> None:
            res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kids}
            rounds = 10
            for _ in range(rounds):
                for k, (t, _c) in kids.items():
                    for _ in range(max(1, a.n // rounds)):
                        res[k].append(await _one(t))
            print("| configuration | CONNECT → 200 | TLS handshake | GET | total (p50) |")
            print("|---|---:|---:|---:|---:|")
            for k, v in res.items():
                med = [st.median(x[i] for x in v) * 1e3 for i in range(3)]
                tot = st.median(sum(x) for x in v) * 1e3
                print(
                    f"| {k} | {med[0]:.2f} ms | {med[1]:.2f} ms | {med[2]:.2f} ms | {tot:.2f} ms |"
                )

        asyncio.run(run())
    finally:
        for _t, c in kids.values():
            c.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
