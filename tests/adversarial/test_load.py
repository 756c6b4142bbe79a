"""Load and soak: many tunnels held open while new connections are decided.

The CI version holds 100 tunnels for a 10 s mixed load; the soak version (``-m soak``)
holds 500 for 60 s. Both measure the proxy's open file descriptors and resident memory
(first and last window of the load, and after everything closed), and join the audit log
with what the clients and the upstream saw: every connection has its decision and, once
closed, its close record.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from adversarial.stats import STATS
from support.adv_lab import Lab, audit_verify, wait_for
from support.adv_wire import TLSTunnel, exchange, read_outcome
from support.procfs import proc_stats
from support.proxy import ProxyProcess

FD_SLACK = 8


@dataclass
class LoadResult:
    ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    allowed_conns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, ok: bool, detail: str = "", conns: int = 0) -> None:
        with self.lock:
            self.ops[kind] = self.ops.get(kind, 0) + 1
            self.allowed_conns += conns if ok else 0
            if not ok and len(self.errors) < 50:
                self.errors.append(f"{kind}: {detail}")


def _hold_tunnel(lab: Lab, p: ProxyProcess, i: int) -> Any:
    """CONNECT api.test to the plain-HTTP port and run one request through the raw
    tunnel; the socket stays open (keep-alive) and is returned."""
    ah = lab.ports["AH"]
    sock, out = exchange(
        p.port, f"CONNECT api.test:{ah} HTTP/1.1\r\n\r\n".encode(), src=_src(1, i), timeout=30
    )
    if sock is None or out.status != 200:
        raise AssertionError(f"tunnel {i}: {out.short()}")
    sock.sendall(f"GET /held-{i} HTTP/1.1\r\nHost: api.test:{ah}\r\n\r\n".encode())
    r = read_outcome(sock, 30)
    if r.status != 200:
        sock.close()
        raise AssertionError(f"tunnel {i}: request got {r.short()}")
    return sock


def _src(group: int, i: int) -> str:
    return f"127.70.{group * 8 + i // 250}.{i % 250 + 1}"


def _one_op(lab: Lab, p: ProxyProcess, rng: random.Random, worker: int, res: LoadResult) -> None:
    ports = lab.ports
    kind = rng.choice(["tls", "plain", "tunnel-plain", "blocked-connect", "blocked-http"])
    src = _src(4, worker)
    try:
        if kind == "tls":
            sock, out = exchange(
                p.port,
                f"CONNECT api.test:{ports['AA']} HTTP/1.1\r\n\r\n".encode(),
                src=src,
                timeout=20,
            )
            if sock is None or out.status != 200:
                res.add(kind, False, out.short())
                return
            try:
                t = TLSTunnel(sock, "api.test", str(lab.ca_file))
                t.handshake(timeout=20)
                r = t.request(b"GET /load-tls HTTP/1.1\r\nHost: api.test\r\n\r\n", timeout=20)
            finally:
                sock.close()
            res.add(kind, r.status == 200, r.short(), conns=1)
        elif kind == "plain":
            sock, out = exchange(
                p.port,
                f"GET http://api.test:{ports['AH']}/load-plain HTTP/1.1\r\nHost: api.test:{ports['AH']}\r\nConnection: close\r\n\r\n".encode(),
                src=src,
                timeout=20,
            )
            if sock is not None:
                sock.close()
            res.add(kind, out.status == 200, out.short(), conns=1)
        elif kind == "tunnel-plain":
            sock, out = exchange(
                p.port,
                f"CONNECT api.test:{ports['AH']} HTTP/1.1\r\n\r\n".encode(),
                src=src,
                timeout=20,
            )
            if sock is None or out.status != 200:
                res.add(kind, False, out.short())
                return
            try:
                sock.sendall(
                    f"GET /load-tunnel HTTP/1.1\r\nHost: api.test:{ports['AH']}\r\n\r\n".encode()
                )
                r = read_outcome(sock, 20)
            finally:
                sock.close()
            res.add(kind, r.status == 200, r.short(), conns=1)
        elif kind == "blocked-connect":
            sock, out = exchange(
                p.port,
                f"CONNECT other.test:{ports['PF']} HTTP/1.1\r\n\r\n".encode(),
                src=src,
                timeout=20,
            )
            if sock is not None:
                sock.close()
            res.add(kind, out.status == 403 and out.guard_reason == "not_allowlisted", out.short())
        else:
            sock, out = exchange(
                p.port,
                f"GET http://meta.test:{ports['PF']}/latest HTTP/1.1\r\nHost: meta.test:{ports['PF']}\r\n\r\n".encode(),
                src=src,
                timeout=20,
            )
            if sock is not None:
                sock.close()
            res.add(kind, out.status == 403 and out.guard_reason == "private_address", out.short())
    except OSError as e:
        res.add(kind, False, repr(e))


def _sampler(pid: int, stop: threading.Event, samples: list[tuple[float, int, int]]) -> None:
    start = time.monotonic()
    while not stop.wait(0.5):
        try:
            s = proc_stats(pid)
        except OSError:
            return
        samples.append((time.monotonic() - start, s["fds"], s["rss_kb"]))


def _window(
    samples: list[tuple[float, int, int]], first: bool, span: float = 2.0
) -> dict[str, int]:
    if not samples:
        return {"fds": 0, "rss_kb": 0}
    end = samples[-1][0]
    sel = [s for s in samples if (s[0] <= span if first else s[0] >= end - span)] or samples
    return {"fds": max(s[1] for s in sel), "rss_kb": max(s[2] for s in sel)}


def run_load(
    lab: Lab, name: str, tunnels: int, seconds: float, workers: int, rss_bound_kb: int
) -> None:
    STATS.ran.add("test_load")
    p = lab.proxy(name, "--audit-fsync", "interval")
    assert p.proc is not None
    pid = p.proc.pid
    before_contact = lab.never_contact()
    api_requests_before = len(lab.api_http.seen.requests) + len(lab.api_tls.seen.requests)

    # warm-up: load every code path once so later growth means a leak, not a first import
    warm = LoadResult()
    rng = random.Random(1)
    for i in range(40):
        _one_op(lab, p, rng, i % workers, warm)
    assert not warm.errors, warm.errors
    time.sleep(1.0)
    baseline = proc_stats(pid)

    # hold N tunnels, opened 32 at a time
    held: list[Any] = []
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_hold_tunnel, lab, p, i) for i in range(tunnels)]
        failures = []
        for f in futures:
            try:
                held.append(f.result(timeout=120))
            except Exception as e:  # collect, then fail with all of them
                failures.append(repr(e))
    assert not failures, failures[:5]
    assert len(held) == tunnels
    with_held = proc_stats(pid)
    STATS.tunnels_peak[name] = len(held)

    # mixed load while they are held
    res = LoadResult()
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(pid, stop, samples), daemon=True)
    sampler.start()
    deadline = time.monotonic() + seconds

    def worker(w: int) -> None:
        rng = random.Random(1000 + w)
        while time.monotonic() < deadline:
            _one_op(lab, p, rng, w, res)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    stop.set()
    sampler.join(5)

    # every held tunnel still works after the load
    ah = lab.ports["AH"]
    alive = 0
    for i, sock in enumerate(held):
        try:
            sock.sendall(f"GET /still-{i} HTTP/1.1\r\nHost: api.test:{ah}\r\n\r\n".encode())
            if read_outcome(sock, 20).status == 200:
                alive += 1
        except OSError:
            pass
    for sock in held:
        sock.close()

    # everything closed: descriptors back to the baseline, memory bounded
    settled = wait_for(lambda: proc_stats(pid)["fds"] <= baseline["fds"] + FD_SLACK, timeout=20)
    after = proc_stats(pid)
    first, last = _window(samples, True), _window(samples, False)
    total_ops = sum(res.ops.values())
    figures = {
        "tunnels held": len(held),
        "tunnels still working after the load": alive,
        "mixed-load seconds": seconds,
        "mixed-load operations": total_ops,
        "operations per second": round(total_ops / seconds, 1),
        "operation errors": len(res.errors),
        "fds baseline (after warm-up)": baseline["fds"],
        "fds with tunnels held": with_held["fds"],
        "fds first window": first["fds"],
        "fds last window": last["fds"],
        "fds after all closed": after["fds"],
        "RSS kB baseline": baseline["rss_kb"],
        "RSS kB with tunnels held": with_held["rss_kb"],
        "RSS kB first window": first["rss_kb"],
        "RSS kB last window": last["rss_kb"],
        "RSS kB after all closed": after["rss_kb"],
    }
    STATS.load[name] = figures
    assert not res.errors, (res.errors[:10], res.ops)
    assert alive == tunnels, f"{tunnels - alive} held tunnels broke during the load"
    assert settled, f"fd leak: {after['fds']} open after close, baseline {baseline['fds']}"
    assert last["rss_kb"] - first["rss_kb"] <= rss_bound_kb, figures
    assert after["rss_kb"] - baseline["rss_kb"] <= rss_bound_kb + 32 * tunnels, figures

    # nothing forbidden was reached, and the audit log has every connection
    assert lab.never_contact() == before_contact
    allowed_total = warm.allowed_conns + res.allowed_conns + tunnels
    closes = wait_for(
        lambda: (
            c
            if len(c := [r for r in p.audit("close") if r.get("host") == "api.test"])
            >= allowed_total
            else None
        ),
        timeout=30,
    )
    decisions = p.audit("decision")
    allows = [r for r in decisions if r["decision"] == "allow" and r["host"] == "api.test"]
    blocks = [r for r in decisions if r["decision"] == "block"]
    blocked_ops = sum(v for r in (warm, res) for k, v in r.ops.items() if k.startswith("blocked"))
    api_requests = (
        len(lab.api_http.seen.requests) + len(lab.api_tls.seen.requests) - api_requests_before
    )
    figures["allow decisions"] = len(allows)
    figures["block decisions"] = len(blocks)
    figures["close records"] = len(closes or [])
    figures["requests the upstream saw"] = api_requests
    assert closes is not None, f"close records: expected {allowed_total}"
    assert len(closes) == allowed_total, (len(closes), allowed_total)
    # plain HTTP inside a CONNECT tunnel is read request by request, each request a
    # decision of its own: one per tunnel-plain operation, two per held tunnel
    in_tunnels = sum(r.ops.get("tunnel-plain", 0) for r in (warm, res)) + 2 * tunnels
    assert len(allows) == allowed_total + in_tunnels, (len(allows), allowed_total, in_tunnels)
    assert len(blocks) == blocked_ops, (len(blocks), blocked_ops)
    # each allowed connection carried exactly one request, each held tunnel two
    assert api_requests == warm.allowed_conns + res.allowed_conns + 2 * tunnels
    p.stop()
    v = audit_verify(p.audit_path)
    assert v.returncode == 0, v.stdout + v.stderr


def test_load_ci(lab: Lab) -> None:
    """100 tunnels held, 10 s of mixed load by 8 clients."""
    run_load(lab, "load-ci", tunnels=100, seconds=10, workers=8, rss_bound_kb=64 * 1024)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_load_soak(lab: Lab) -> None:
    """500 tunnels held, 60 s of mixed load by 12 clients."""
    run_load(lab, "load-soak", tunnels=500, seconds=60, workers=12, rss_bound_kb=96 * 1024)
