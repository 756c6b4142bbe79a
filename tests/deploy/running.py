"""A running egress-guard for the deployment tests, and what its /metrics exports."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric
from support.proxy import ProxyProcess


@dataclass
class RunningGuard:
    proxy: ProxyProcess
    metrics_port: int
    families: list[Metric]
    metrics_text: str

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/healthz"


def connect_unlisted(host: str, port: int) -> bytes:
    """One CONNECT for a host no policy lists: blocked before any DNS or upstream contact."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"CONNECT unlisted.invalid:443 HTTP/1.1\r\nHost: unlisted.invalid:443\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def get_through(proxy_host: str, proxy_port: int, target: str) -> bytes:
    """A plain-HTTP request through the proxy; returns the whole response."""
    with socket.create_connection((proxy_host, proxy_port), timeout=10) as s:
        s.sendall(
            f"GET http://{target}/deploy HTTP/1.1\r\nHost: {target}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def exported_series(families: list[Metric]) -> dict[str, set[str]]:
    """Series name -> label names, for every name a PromQL query may use: each sample
    name, and for each family the names its type implies (``_total``, ``_bucket``...)."""
    out: dict[str, set[str]] = {}
    for fam in families:
        labels: set[str] = set()
        for s in fam.samples:
            labels.update(s.labels)
            out.setdefault(s.name, set()).update(s.labels)
        base = labels - {"le"}
        if fam.type == "counter":
            out.setdefault(fam.name + "_total", set()).update(base)
        elif fam.type == "histogram":
            out.setdefault(fam.name + "_bucket", set()).update(base | {"le"})
            out.setdefault(fam.name + "_sum", set()).update(base)
            out.setdefault(fam.name + "_count", set()).update(base)
        else:
            out.setdefault(fam.name, set()).update(base)
    return out


def docs_path(name: str) -> Path:
    return Path(__file__).resolve().parents[2] / "docs" / name
