"""The loopback TLS upstream: nginx when installed, else a small asyncio server.

Serves ``GET /`` (a 3-byte body) and ``GET /bulk`` (BULK_BYTES), HTTP/1.1 with keep-alive,
on 127.0.0.1 only. Run as a module for the Python fallback:
``python -m bench.upstream --port P --cert leaf.pem --key leaf.key``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import sys
from pathlib import Path

BULK_BYTES = 10 * 1024 * 1024
SMALL_BODY = b"ok\n"

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-tmp;
    proxy_temp_path {dir}/nginx-tmp;
    fastcgi_temp_path {dir}/nginx-tmp;
    uwsgi_temp_path {dir}/nginx-tmp;
    scgi_temp_path {dir}/nginx-tmp;
    keepalive_timeout 600s;
    keepalive_requests 100000;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name bench.test;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # every tunnel pays a full handshake, as a new client connection would
        ssl_session_cache off;
        ssl_session_tickets off;
        location = / {{ default_type text/plain; return 200 "ok\\n"; }}
        location = /bulk {{ default_type application/octet-stream; alias {dir}/bulk.bin; }}
    }}
}}
"""


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_argv(workdir: Path, port: int, cert: Path, key: Path) -> list[str]:
    binary = nginx_path()
    assert binary is not None
    (workdir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    bulk = workdir / "bulk.bin"
    if not bulk.exists() or bulk.stat().st_size != BULK_BYTES:
        bulk.write_bytes(os.urandom(BULK_BYTES))
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, cert=cert, key=key))
    return [binary, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]


def python_argv(port: int, cert: Path, key: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.upstream",
        "--port",
        str(port),
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]


# -- the Python fallback -------------------------------------------------------------------

_BULK = os.urandom(1024 * 1024)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            line = head.split(b"\r\n", 1)[0].split()
            path = line[1] if len(line) > 1 else b"/"
            close = b"connection: close" in head.lower()
            conn = b"close" if close else b"keep-alive"
            if path == b"/bulk":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\nConnection: %s\r\n\r\n" % (BULK_BYTES, conn)
                )
                for _ in range(BULK_BYTES // len(_BULK)):
                    writer.write(_BULK)
                    await writer.drain()
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                    b"Connection: %s\r\n\r\n%s" % (len(SMALL_BODY), conn, SMALL_BODY)
                )
                await writer.drain()
            if close:
                return
    except (ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _serve(port: int, cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(_handle, "127.0.0.1", port, ssl=ctx, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    asyncio.run(_serve(a.port, a.cert, a.key))


if __name__ == "__main__":
    main()
