"""``python -m bench``: run every configuration side by side and write bench/RESULTS.md.

One run, all numbers from it. The proxies are started once and measured in interleaved
rounds (each round visits every configuration, in a rotated order), so a burst of other
work on the machine is spread over all rows instead of landing on one. Loopback only;
every phase is bounded by a duration and a request cap; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen
from bench.certs import make_certs
from bench.configs import CONFIGS, EXPERIMENTS, Config, Env, Skip
from bench.procs import Child, free_port
from bench.upstream import BULK_BYTES, nginx_argv, nginx_path, python_argv

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "RESULTS.md"
MAX_REQUESTS = 200_000  # per phase; the duration is what normally ends a phase


@dataclass
class Totals:
    cpu_s: float = 0.0
    mb: float = 0.0

    def per_mb_ms(self) -> float | None:
        return self.cpu_s * 1e3 / self.mb if self.mb else None


@dataclass
class Stats:
    cfg: Config
    child: Child | None = None
    target: loadgen.Target | None = None
    skipped: str | None = None
    c8_rates: list[float] = field(default_factory=list)
    c8_lat: list[float] = field(default_factory=list)
    c1_lat: list[float] = field(default_factory=list)
    #: bulk MB/s with curl as the client (the target's figure); with the asyncio client
    bulk: list[float] = field(default_factory=list)
    bulk_py: list[float] = field(default_factory=list)
    #: proxy CPU seconds during the bulk downloads and MB they moved, summed over all
    #: rounds (curl; asyncio): one download's CPU is a tick or two of the kernel's clock
    bulk_cpu: Totals = field(default_factory=Totals)
    bulk_py_cpu: Totals = field(default_factory=Totals)
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    cpu_s: float = 0.0
    cpu_tunnels: int = 0
    #: proxy CPU ms per tunnel, one value per round and phase (c=8 and c=1)
    cpu8_rounds: list[float] = field(default_factory=list)
    cpu1_rounds: list[float] = field(default_factory=list)
    peak_rss_kib: int | None = None
    idle_base_kib: int | None = None
    idle_kib: int | None = None
    idle_open: int = 0
    idle_errors: int = 0

    @property
    def key(self) -> str:
        return self.cfg.key

    def add(self, r: loadgen.Result) -> None:
        self.ok += r.ok
        self.errors += r.errors
        if r.first_error and not self.first_error:
            self.first_error = r.first_error


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Machine:
    """CPU accounting for the whole machine, to say how busy it was with other work."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.stat0 = self._stat()

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    def usage(self) -> tuple[float, float, float]:
        """(busy cores, steal share, wall seconds) since start."""
        s1 = self._stat()
        d = [b - a for a, b in zip(self.stat0, s1, strict=False)]
        tick = os.sysconf("SC_CLK_TCK")
        wall = time.monotonic() - self.t0
        busy = sum(d[i] for i in (0, 1, 2, 5, 6)) / tick  # user nice system irq softirq
        steal = (d[7] if len(d) > 7 else 0) / tick
        ncpu = os.cpu_count() or 1
        return busy / wall, steal / (wall * ncpu), wall


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def measure_round(s: Stats, a: argparse.Namespace) -> None:
    t = s.target
    assert t is not None
    cpu0 = s.child.cpu_seconds() if s.child else 0.0
    r8 = await loadgen.load(t, 8, a.duration, MAX_REQUESTS)
    if s.child:
        cpu1 = s.child.cpu_seconds()
        s.cpu_s += cpu1 - cpu0
        s.cpu_tunnels += r8.ok
        if r8.ok:
            s.cpu8_rounds.append((cpu1 - cpu0) / r8.ok * 1e3)
    s.add(r8)
    s.c8_rates.append(r8.rate)
    s.c8_lat += r8.latencies
    cpu0 = s.child.cpu_seconds() if s.child else 0.0
    r1 = await loadgen.load(t, 1, a.lat_duration, MAX_REQUESTS)
    if s.child and r1.ok:
        s.cpu1_rounds.append((s.child.cpu_seconds() - cpu0) / r1.ok * 1e3)
    s.add(r1)
    s.c1_lat += r1.latencies


async def measure_bulk(live: list[Stats], a: argparse.Namespace) -> None:
    """One round of bulk downloads, download by download across the configurations
    (direct, proxy 1, proxy 2, ..., direct, ...): a 10 MiB download takes tens of
    milliseconds, and the machine's speed drifts over seconds, so a configuration's
    downloads and direct's are taken side by side rather than a whole round apart."""
    mb = BULK_BYTES / 1e6
    for _ in range(a.bulk):
        for s in live:
            t = s.target
            assert t is not None
            clients: list[tuple[str, Awaitable[list[float]], list[float], Totals]] = []
            if loadgen.curl_path():
                clients.append(("curl", loadgen.bulk_curl(t, 1, BULK_BYTES), s.bulk, s.bulk_cpu))
            clients.append(("asyncio", loadgen.bulk(t, 1), s.bulk_py, s.bulk_py_cpu))
            for name, download, rates, cpu in clients:
                try:
                    cpu0 = s.child.cpu_seconds() if s.child else 0.0
                    rates += await download
                    if s.child:
                        cpu.cpu_s += s.child.cpu_seconds() - cpu0
                        cpu.mb += mb
                except loadgen.CLIENT_ERRORS as e:
                    s.errors += 1
                    s.first_error = s.first_error or f"bulk ({name}): {type(e).__name__}: {e}"


async def measure_idle(s: Stats, n: int) -> None:
    if s.child is None or s.target is None:
        return
    await asyncio.sleep(0.5)
    s.idle_base_kib = s.child.rss_kib()
    idle = loadgen.IdleTunnels()
    try:
        await idle.open(s.target, n)
        await asyncio.sleep(1.5)
        s.idle_open = len(idle.writers) - idle.errors
        s.idle_errors = idle.errors
        if s.idle_open > 0:
            s.idle_kib = s.child.rss_kib()
    finally:
        await idle.close()


#: with --pin: (CPUs of the proxy under test, CPUs of the load generator and upstream)
PIN: tuple[set[int], set[int]] | None = None


def start_upstream(wd: Path, leaf: Path, key: Path, force_python: bool) -> tuple[Child, str]:
    port = free_port()
    if nginx_path() and not force_python:
        argv = nginx_argv(wd / "upstream", port, leaf, key)
        kind = "nginx " + (os.popen(f"{nginx_path()} -v 2>&1").read().strip().split("/")[-1])
    else:
        argv = python_argv(port, leaf, key)
        kind = "Python asyncio (bench/upstream.py)" + (
            "" if nginx_path() else "; nginx not installed"
        )
    child = Child("upstream", argv, wd / "upstream", port, env={"PYTHONPATH": str(ROOT)})
    if PIN is not None:
        child.cpus = PIN[1]
    return child.start(), kind


def build_stats(cfgs: list[Config], env: Env, ca: Path) -> list[Stats]:
    out = []
    for cfg in cfgs:
        s = Stats(cfg)
        try:
            if cfg.build is not None:
                s.child = cfg.build(env)
                if PIN is not None:
                    s.child.cpus = PIN[0]
                s.child.start()
            cas = [str(ca)]
            if cfg.extra_ca is not None:
                assert s.child is not None
                cas.append(str(cfg.extra_ca(env, s.child)))
            proxy = ("127.0.0.1", s.child.port) if s.child else None
            bundle = env.workdir / f"ca-{cfg.key}.pem"
            bundle.write_text("".join(Path(c).read_text() for c in cas))
            s.target = loadgen.Target(
                env.upstream_port,
                loadgen.client_context(*cas),
                proxy,
                cfg.connect_host,
                str(bundle),
            )
            log(
                f"started {cfg.key}"
                + (f" (pid {s.child.pid}, port {s.child.port})" if s.child else "")
            )
        except Skip as e:
            s.skipped = str(e)
            log(f"skipping {cfg.key}: {e}")
        except Exception as e:  # a config that cannot start is reported, not fatal
            detail = " ".join(str(e).split())[-300:].replace("|", "/")
            s.skipped = f"failed to start: {type(e).__name__}: {detail}"
            log(f"skipping {cfg.key}: {s.skipped}")
            if s.child is not None:
                s.child.stop()
                s.child = None
        out.append(s)
    return out


async def run_all(stats: list[Stats], a: argparse.Namespace) -> list[str]:
    live = [s for s in stats if s.skipped is None]
    notes = []
    log("warm-up")
    for s in live:
        assert s.target is not None
        r = await loadgen.load(s.target, 8, a.warmup, 2000)
        if r.ok == 0:
            s.skipped = f"no successful request in warm-up ({r.first_error})"
            log(f"dropping {s.key}: {s.skipped}")
    live = [s for s in live if s.skipped is None]
    for rnd in range(a.rounds):
        order = live[rnd % len(live) :] + live[: rnd % len(live)]
        for s in order:
            await measure_round(s, a)
            log(
                f"round {rnd + 1}/{a.rounds} {s.key:14} c8 {s.c8_rates[-1]:7.1f}/s  "
                f"load {loadavg()}"
            )
        await measure_bulk(order, a)
        log(f"round {rnd + 1}/{a.rounds} bulk downloads done")
        notes.append(f"after round {rnd + 1}: load average {loadavg()}")
    for s in live:
        if s.child:
            s.peak_rss_kib = s.child.peak_rss_kib()
    if a.idle > 0:
        log(f"idle tunnels: {a.idle} per proxy")
        for s in live:
            await measure_idle(s, a.idle)
            if s.idle_kib is not None:
                log(
                    f"  {s.key:14} {s.idle_base_kib} -> {s.idle_kib} KiB "
                    f"({s.idle_open} open, {s.idle_errors} errors)"
                )
    return notes


# -- report --------------------------------------------------------------------------------


def fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base == 0:
        return "n/a"
    return f"{v / base:.2f}×"


def ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def report(
    stats: list[Stats],
    a: argparse.Namespace,
    meta: dict[str, str],
    notes: list[str],
    matcher_md: str | None,
    matcher_rows: list | None,
) -> str:
    by = {s.key: s for s in stats}
    live = [s for s in stats if s.skipped is None and s.c8_rates]
    d = by.get("direct")
    m = by.get("mitmdump")
    d_ok = d is not None and d.skipped is None and bool(d.c8_rates)
    m_ok = m is not None and m.skipped is None and bool(m.c8_rates)

    def tput(s: Stats | None) -> float | None:
        return median(s.c8_rates) if s and s.c8_rates else None

    def p(s: Stats | None, which: str, q: float) -> float | None:
        if s is None:
            return None
        return ms(pct(s.c1_lat if which == "c1" else s.c8_lat, q))

    curl_used = any(s.bulk for s in stats)

    def bulk(s: Stats | None) -> float | None:
        """The target's bulk figure: curl's, or the asyncio client's without curl."""
        xs = (s.bulk if curl_used else s.bulk_py) if s else None
        return median(xs) if xs else None

    def bulk_curl(s: Stats | None) -> float | None:
        return median(s.bulk) if s and s.bulk else None

    def bulk_py(s: Stats | None) -> float | None:
        return median(s.bulk_py) if s and s.bulk_py else None

    D = d if d_ok else None
    M = m if m_ok else None
    L: list[str] = []
    if a.experiments:
        L.append("# egress-guard hot-path experiments\n")
        L.append(
            "egress-guard tunnel mode (policy + audit + metrics) with one part removed, "
            "one run flag changed (`--event-loop asyncio`), or one candidate change "
            "patched in by bench/variants.py — nothing in egress_guard/ is changed. "
            "Compare the *proxy CPU per tunnel* column first: it is the least sensitive "
            "to other load on the machine.\n"
        )
    else:
        L.append("# egress-guard benchmark results\n")
    L.append(
        f"Generated by `{meta['command']}` on {meta['date']} — **all numbers below are "
        "from this one run**. Do not edit by hand; rerun the command.\n"
    )
    L.append("## Conditions\n")
    for k in ("machine", "software", "upstream", "parameters", "load", "cpu"):
        L.append(f"- **{k}**: {meta[k]}")
    for n in notes:
        L.append(f"  - {n}")
    L.append("")
    L.append(
        "Each request is a new tunnel: TCP connect to the proxy, `CONNECT host:port`, "
        "TLS 1.3 handshake with the upstream through the tunnel (certificate verified, "
        "no session resumption), `GET /` (3-byte body), close. The load generator "
        "(bench/loadgen.py, asyncio) runs on the same 2 cores as the proxy and the "
        "upstream, so absolute numbers are lower than on an idle or bigger machine; "
        "compare rows, which share the conditions. *×mitmdump* and *×direct* are ratios "
        "to the bare-mitmdump and direct rows of this same run.\n"
    )

    L.append("## Tunnels per second, concurrency 8\n")
    L.append(
        "| configuration | tunnels/s (median of rounds) | rounds min–max | ×mitmdump "
        "| ×direct | proxy CPU/tunnel c=8 | ×mitmdump | proxy CPU/tunnel c=1 | errors |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mcpu = median(M.cpu8_rounds) if M and M.cpu8_rounds else None
    for s in stats:
        if s.skipped is not None:
            L.append(f"| {s.cfg.label} | skipped: {s.skipped} | | | | | | | |")
            continue

        def cpu(xs: list[float]) -> str:
            if not xs:
                return "—"
            return f"{median(xs):.2f} ms" + (
                f" ({min(xs):.2f}–{max(xs):.2f})" if len(xs) > 1 else ""
            )

        L.append(
            f"| {s.cfg.label} | {fmt(tput(s), ',.0f')} | {min(s.c8_rates):,.0f}–"
            f"{max(s.c8_rates):,.0f} | {ratio(tput(s), tput(M))} | {ratio(tput(s), tput(D))} "
            f"| {cpu(s.cpu8_rounds)} | {ratio(median(s.cpu8_rounds) if s.cpu8_rounds else None, mcpu)} "
            f"| {cpu(s.cpu1_rounds)} | {s.errors} |"
        )
    L.append(
        "\n*proxy CPU/tunnel*: user+system CPU of the proxy's process(es) during a phase "
        "divided by the tunnels completed in it; median of the rounds (min–max). It is "
        "the figure least disturbed by other load on the machine.\n"
    )

    L.append("## Latency (new tunnel + TLS + GET, to the last byte)\n")
    L.append(
        "| configuration | c=1 p50 | c=1 p99 | c=1 p50 ×mitmdump | c=1 p50 ×direct "
        "| p50 added over direct | added ×mitmdump's | c=8 p50 | c=8 p99 "
        "| c=8 p50 ×mitmdump | c=8 p50 ×direct |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    d50 = p(D, "c1", 50)
    m50 = p(M, "c1", 50)
    m_added = None if m50 is None or d50 is None else m50 - d50
    for s in live:
        s50 = p(s, "c1", 50)
        added = None if s50 is None or d50 is None else s50 - d50
        L.append(
            f"| {s.cfg.label} | {fmt(s50, '.2f', ' ms')} | {fmt(p(s, 'c1', 99), '.2f', ' ms')} "
            f"| {ratio(s50, m50)} | {ratio(s50, d50)} | {fmt(added, '+.2f', ' ms')} "
            f"| {ratio(added, m_added) if s.key != 'direct' else '—'} "
            f"| {fmt(p(s, 'c8', 50), '.2f', ' ms')} | {fmt(p(s, 'c8', 99), '.2f', ' ms')} "
            f"| {ratio(p(s, 'c8', 50), p(M, 'c8', 50))} | {ratio(p(s, 'c8', 50), p(D, 'c8', 50))} |"
        )
    L.append(
        f"\nPercentiles over all requests of all rounds (c=1: {a.lat_duration:g} s per "
        f"round, c=8: {a.duration:g} s per round).\n"
    )

    L.append(f"## Bulk download ({BULK_BYTES // (1024 * 1024)} MiB through one tunnel)\n")
    L.append(
        "| configuration | MB/s, curl client (median) | min–max | ×mitmdump | ×direct "
        "| proxy CPU per MB | MB/s, asyncio client (median) | ×direct | proxy CPU per MB |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in live:
        bc, bp = bulk_curl(s), bulk_py(s)
        rng = f"{min(s.bulk):,.0f}–{max(s.bulk):,.0f}" if s.bulk else "n/a"
        L.append(
            f"| {s.cfg.label} | {fmt(bc, ',.0f')} | {rng} | {ratio(bc, bulk_curl(M))} "
            f"| {ratio(bc, bulk_curl(D))} "
            f"| {fmt(s.bulk_cpu.per_mb_ms(), '.2f', ' ms')} "
            f"| {fmt(bp, ',.0f')} | {ratio(bp, bulk_py(D))} "
            f"| {fmt(s.bulk_py_cpu.per_mb_ms(), '.2f', ' ms')} |"
        )
    L.append(
        f"\nMB = 10^6 bytes; from sending the GET to the last byte (tunnel set-up "
        f"excluded); {a.bulk} downloads per round with each client, taken download by "
        "download across the configurations (direct, proxy, proxy, …, direct, …) so that "
        "each row's downloads and direct's see the machine in the same state. *proxy CPU "
        "per MB*: the proxy's CPU during all its downloads of the run over the MB they "
        "moved; it includes each download's tunnel set-up (see the CPU per tunnel above). "
        "The target uses the curl column"
        + ("" if curl_used else " (curl is not installed here: the asyncio column instead)")
        + ". The asyncio client (bench/loadgen.py) spends about twice nginx's CPU per MB "
        "on its own TLS and buffering, so on a small machine its column is mostly the "
        "three processes sharing the cores; curl (C, OpenSSL) is the kind of client a "
        "throughput figure is normally taken with, and it also makes *direct* faster.\n"
    )

    L.append("## Memory\n")
    L.append(
        f"| configuration | peak RSS after the load rounds | ×mitmdump | RSS before idle "
        f"| RSS with {a.idle} idle tunnels | per idle tunnel | ×mitmdump |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    mi = None
    if M and M.idle_kib is not None and M.idle_base_kib is not None and M.idle_open:
        mi = (M.idle_kib - M.idle_base_kib) / M.idle_open
    for s in live:
        if s.child is None:
            L.append(f"| {s.cfg.label} | — | — | — | — | — | — |")
            continue
        per = None
        if s.idle_kib is not None and s.idle_base_kib is not None and s.idle_open:
            per = (s.idle_kib - s.idle_base_kib) / s.idle_open
        mib = lambda k: None if k is None else k / 1024  # noqa: E731
        idle_note = "" if not s.idle_errors else f" ({s.idle_errors} failed)"
        L.append(
            f"| {s.cfg.label} | {fmt(mib(s.peak_rss_kib), '.1f', ' MiB')} "
            f"| {ratio(s.peak_rss_kib, M.peak_rss_kib if M else None)} "
            f"| {fmt(mib(s.idle_base_kib), '.1f', ' MiB')} "
            f"| {fmt(mib(s.idle_kib), '.1f', ' MiB')}{idle_note} | {fmt(per, '.1f', ' KiB')} "
            f"| {ratio(per, mi)} |"
        )
    L.append(
        "\nRSS summed over the proxy's processes (squid's helpers included). Idle tunnels: "
        "CONNECT + TLS + one keep-alive GET, then held open without traffic; per tunnel = "
        "(RSS with them − RSS before) / tunnels open. Direct has no proxy process.\n"
    )

    if matcher_md is not None:
        L.append("## Matcher micro-benchmark (egress_guard.engine, in a process of its own)\n")
        L.append(matcher_md)
        L.append(
            "\nRules: exact : `*.` : `**.` : CIDR = 4 : 2 : 2 : 2, ten per destination, "
            "loaded from YAML by the real loader. Query mix: 30% exact hits, 20% "
            "`*.` hits, 20% `**.` hits, 15% IP literals inside a CIDR, 15% misses. "
            "*matcher decisions* are the name rule (`engine.rules.names.decide_name`) on "
            "targets already "
            "normalised: the deny rules, the allow index, the port, and the Decision or "
            "Match with its hint (DESIGN.md's engine is normaliser, matcher and Decision; "
            "this is the last two). *decide_target* takes the raw CONNECT host and port "
            "strings, so it adds the normaliser (hits/s and misses/s are its). "
            "*decide(Target)* is the engine's entry point as the proxy asks it for a "
            "CONNECT (raw strings): one facts tuple, the normaliser, the names, the mode, "
            "and the address checks of the IP literals (a name answers NeedsAddresses). "
            "*HostIndex.match_name* is the name index lookup alone. "
            f"Medians of {a.matcher_rounds} interleaved rounds, in a fresh Python process "
            "started by the bench after the proxy runs (`python -m bench.matcher`), so the "
            "figures do not depend on what the load generator left in its heap.\n"
        )

    L.append("## Must-show targets (issue #9)\n")
    L.append("| target | measured | result |")
    L.append("|---|---|---|")
    g = by.get("guard_tunnel")
    G = g if g is not None and g.skipped is None and g.c8_rates else None

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**not met**")

    r_t = None if G is None or M is None else tput(G) / tput(M)  # type: ignore[operator]
    L.append(
        f"| tunnel mode ≥ 1.3× bare mitmdump tunnels/s at c=8 | {fmt(tput(G), ',.0f')} vs "
        f"{fmt(tput(M), ',.0f')} /s = {fmt(r_t, '.2f', '×')} | "
        f"{verdict(None if r_t is None else r_t >= 1.3)} |"
    )
    if G and M and G.cpu8_rounds and M.cpu8_rounds:
        gc_, mc_ = median(G.cpu8_rounds), median(M.cpu8_rounds)
        L.append(
            f"| (context, not a target) proxy CPU per tunnel at c=8 | {gc_:.2f} ms vs "
            f"{mc_:.2f} ms: mitmdump spends {mc_ / gc_:.2f}× the guard's CPU per tunnel "
            "| — |"
        )
    g50 = p(G, "c1", 50)
    g_added = None if g50 is None or d50 is None else g50 - d50
    r_l = None if g_added is None or not m_added else g_added / m_added
    L.append(
        f"| p50 added over direct at c=1 ≤ 0.6× what mitmdump adds | "
        f"{fmt(g_added, '+.2f', ' ms')} vs {fmt(m_added, '+.2f', ' ms')} = "
        f"{fmt(r_l, '.2f', '×')} | {verdict(None if r_l is None else r_l <= 0.6)} |"
    )
    r_b = None if G is None or D is None or not bulk(D) else bulk(G) / bulk(D)  # type: ignore[operator]
    L.append(
        f"| bulk throughput ≥ 0.7× direct ({'curl' if curl_used else 'asyncio'} client) "
        f"| {fmt(bulk(G), ',.0f')} vs {fmt(bulk(D), ',.0f')}"
        f" MB/s = {fmt(r_b, '.2f', '×')} | {verdict(None if r_b is None else r_b >= 0.7)} |"
    )
    g_py, d_py = bulk_py(G), bulk_py(D)
    if curl_used and g_py and d_py:
        L.append(
            f"| (context, not a target) bulk with the asyncio client | {g_py:,.0f} vs "
            f"{d_py:,.0f} MB/s = {g_py / d_py:.2f}× | — |"
        )
    refs = []
    for key in ("squid", "bare_relay"):
        ref = by.get(key)
        if ref is not None and ref.skipped is None and bulk(ref) and D is not None and bulk(D):
            refs.append(f"{ref.cfg.label}: {bulk(ref) / bulk(D):.2f}× direct")  # type: ignore[operator]
    if refs:
        L.append(
            f"| (context, not a target) bulk of other relays in this run | {'; '.join(refs)} | — |"
        )
    if matcher_rows:
        rows = {r.rules: r for r in matcher_rows}
        r10, r10k = rows.get(10), rows.get(10_000)
        if r10 and r10k:
            for what, attr, target in (
                ("matcher decisions (canonical target → Decision)", "matcher_per_s", True),
                ("decide_target (normaliser + matcher)", "decide_per_s", False),
                ("decide(Target) (the entry point, IP literals' addresses)", "entry_per_s", False),
                ("HostIndex lookup alone", "index_per_s", False),
            ):
                v10, v10k = getattr(r10, attr), getattr(r10k, attr)
                ok = v10k >= 200_000 and v10 / v10k <= 1.5
                measured = f"{v10k:,.0f}/s at 10k, {v10:,.0f}/s at 10 ({v10 / v10k:.2f}× apart)"
                if target:
                    L.append(
                        "| matcher ≥ 200k decisions/s at 10k rules, within 1.5× of 10 rules "
                        f"— {what} | {measured} | {verdict(ok)} |"
                    )
                else:
                    L.append(
                        f"| (context, not a target) {what} | {measured}; "
                        f"{'within' if ok else 'outside'} the matcher target | — |"
                    )
    if G and G.idle_kib is not None and G.idle_base_kib is not None and G.idle_open:
        per = (G.idle_kib - G.idle_base_kib) / G.idle_open
        L.append(
            f"| memory: RSS with {a.idle} idle tunnels, per tunnel | {per:.1f} KiB per "
            f"tunnel ({G.idle_kib / 1024:.1f} MiB with {G.idle_open} open; mitmdump "
            f"{fmt(mi, '.1f', ' KiB')}) | reported |"
        )
    L.append("")
    L.append("## Configurations\n")
    for s in stats:
        L.append(
            f"- **{s.cfg.label}** — {s.cfg.note}"
            + (f" *(skipped: {s.skipped})*" if s.skipped else "")
        )
        if s.first_error:
            L.append(f"  - first error: `{s.first_error[:200]}`")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # Many short rounds rather than a few long ones: on a VM whose speed drifts for a
    # minute or more at a time, every configuration then sees every phase of it.
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    ap.add_argument(
        "--duration",
        type=float,
        default=1.5,
        help="seconds of c=8 load per configuration per round (default 1.5)",
    )
    ap.add_argument(
        "--lat-duration",
        type=float,
        default=0.7,
        help="seconds of c=1 load per configuration per round (default 0.7)",
    )
    ap.add_argument(
        "--bulk", type=int, default=3, help="10 MiB downloads per round and client (default 3)"
    )
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--idle", type=int, default=500, help="idle tunnels for the memory test")
    ap.add_argument(
        "--only",
        help="comma-separated configuration keys (direct and mitmdump "
        "are always kept for the ratios)",
    )
    ap.add_argument("--skip", default="", help="comma-separated configuration keys to skip")
    ap.add_argument("--matcher-sizes", default="10,1000,10000,100000")
    ap.add_argument(
        "--matcher-seconds", type=float, default=3.0, help="measuring time per size (default 3)"
    )
    ap.add_argument(
        "--matcher-rounds",
        type=int,
        default=7,
        help="interleaved rounds per size, the median reported (default 7)",
    )
    ap.add_argument("--no-matcher", action="store_true")
    ap.add_argument(
        "--python-upstream",
        action="store_true",
        help="use the Python upstream even if nginx is installed",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 2 s, 100 idle tunnels, small matcher (a smoke run)",
    )
    ap.add_argument(
        "--experiments",
        action="store_true",
        help="compare egress-guard tunnel mode with candidate changes patched in "
        "(bench/variants.py) instead of the standard comparison; writes "
        "bench/EXPERIMENTS.md unless --out is given",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="run each proxy on the last CPU and the load generator and upstream on the "
        "others (removes the scheduler's placement from the comparison; direct then has "
        "one CPU fewer)",
    )
    ap.add_argument("--out", help="where to write the report (default bench/RESULTS.md)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.lat_duration, a.bulk, a.idle = 1, 2.0, 1.0, 1, 100
        a.matcher_sizes, a.matcher_seconds = "10,10000", 0.6

    every = CONFIGS + EXPERIMENTS
    keys = {c.key for c in every}
    if a.experiments:
        base = {"direct", "mitmdump", "minimal", "guard_tunnel"}
        cfgs = [c for c in CONFIGS if c.key in base] + list(EXPERIMENTS)
        a.out = a.out or str(ROOT / "bench" / "EXPERIMENTS.md")
        a.no_matcher = True
    else:
        cfgs = list(CONFIGS)
    a.out = a.out or str(DEFAULT_OUT)
    if a.only:
        want = set(a.only.split(",")) | {"direct", "mitmdump"}
        if want - keys:
            ap.error(f"unknown configuration(s): {', '.join(sorted(want - keys))}")
        cfgs = [c for c in every if c.key in want]
    skip = {k for k in a.skip.split(",") if k}
    cfgs = [c for c in cfgs if c.key not in skip]

    global PIN
    if a.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        PIN = ({cpus[-1]}, set(cpus[:-1]))
        os.sched_setaffinity(0, PIN[1])
    t_start = time.monotonic()
    machine = Machine()
    load0 = loadavg()
    wd = Path(tempfile.mkdtemp(prefix="egress-guard-bench-"))
    wd.chmod(0o711)  # squid and tinyproxy drop privileges and must reach their subdirectories
    log(f"work directory {wd}; load average {load0}")
    upstream: Child | None = None
    stats: list[Stats] = []
    notes: list[str] = []
    self_cpu0 = self_cpu()
    children_cpu = 0.0
    try:
        ca, leaf, key = make_certs(wd / "certs")
        upstream, up_kind = start_upstream(wd, leaf, key, a.python_upstream)
        log(f"upstream: {up_kind} on 127.0.0.1:{upstream.port}")
        env = Env(wd, upstream.port, ca)
        stats = build_stats(cfgs, env, ca)
        notes = asyncio.run(run_all(stats, a))
        children_cpu = sum(s.child.cpu_seconds() for s in stats if s.child) + upstream.cpu_seconds()
    finally:
        for s in stats:
            if s.child is not None:
                s.child.stop()
        if upstream is not None:
            upstream.stop()
    busy, steal, wall = machine.usage()
    ours = (self_cpu() - self_cpu0 + children_cpu) / wall
    load1 = loadavg()

    matcher_md = matcher_rows = None
    if not a.no_matcher:
        from bench import matcher

        log("matcher micro-benchmark")
        sizes = tuple(int(x) for x in a.matcher_sizes.split(","))
        matcher_rows = matcher.run_isolated(sizes, a.matcher_seconds, a.matcher_rounds)
        matcher_md = matcher.markdown(matcher_rows)

    import mitmproxy.version

    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
        )
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command.strip(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model}), Linux {platform.release()}",
        "software": (
            f"Python {platform.python_version()}, mitmproxy {mitmproxy.version.VERSION}, "
            f"{ssl.OPENSSL_VERSION}; squid {shutil.which('squid') and 'installed'}, "
            f"tinyproxy {shutil.which('tinyproxy') and 'installed'}"
        ),
        "upstream": f"{up_kind if upstream else '?'} on 127.0.0.1, TLS 1.3, ECDSA P-256 "
        "certificate, no session resumption",
        "parameters": (
            f"{a.rounds} interleaved rounds; per configuration per round: "
            f"{a.duration:g} s at c=8, {a.lat_duration:g} s at c=1, {a.bulk} × "
            f"10 MiB{' with curl and ' + str(a.bulk) if loadgen.curl_path() else ''} with the "
            f"asyncio client; warm-up {a.warmup:g} s; {a.idle} idle tunnels"
            + (
                f"; pinned: proxy on CPU {sorted(PIN[0])}, load generator and upstream on "
                f"CPU {sorted(PIN[1])}"
                if PIN is not None
                else ""
            )
        ),
        "load": f"load average {load0} at start, {load1} at the end of the proxy runs",
        "cpu": (
            f"during the proxy runs ({wall:.0f} s) the machine was busy {busy:.2f} of "
            f"{os.cpu_count()} cores; this bench (load generator + proxies + upstream) "
            f"accounts for {ours:.2f}, other work for {max(0.0, busy - ours):.2f}; "
            f"hypervisor steal {steal:.0%}"
        ),
    }
    md = report(stats, a, meta, notes, matcher_md, matcher_rows)
    out = Path(a.out)
    out.write_text(md)
    print(md)
    log(f"wrote {out} in {time.monotonic() - t_start:.0f} s")
    if not a.keep:
        shutil.rmtree(wd, ignore_errors=True)
    else:
        log(f"kept {wd}")
    return 0
