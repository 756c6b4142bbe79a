"""Matcher micro-benchmark: engine decisions/s at 10, 1k, 10k and 100k host rules.

Rules are a mix of exact names, ``*.`` and ``**.`` wildcards and CIDRs (4:2:2:2), ten per
destination, loaded through the real policy loader (YAML text -> EffectivePolicy ->
Engine). Queries are CONNECT targets: hits of each kind, IP literals inside the CIDRs,
and misses (which build the "how to allow it" hint). Three figures per size:

- *matcher*: the name rule (``engine.rules.names.decide_name``) on targets already
  normalised (DESIGN.md's engine is normaliser + matcher + Decision; this is the matcher
  and the Decision);
- *decide_target*: the same from raw host and port strings, normaliser included (the
  name rule ``engine.rules.names.decide_target``);
- *decide(Target)*: ``Engine.decide(Target(host, port))`` from raw strings, as the
  proxy asks for a CONNECT: one facts tuple, the normaliser, the names, the mode, and
  for a target with a known address (the IP literals) its address checks; a name
  answers NeedsAddresses (the proxy resolves it);
- *HostIndex.match_name*: the name index alone.

``python -m bench.matcher [--sizes 10,1000] [--seconds 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from egress_guard.engine import Engine, Match, Target
from egress_guard.engine.rules.names import decide_name, decide_target
from egress_guard.normalize import Host, normalize_host, normalize_port
from egress_guard.policy import load_catalog, load_policy_text
from egress_guard.proxy.master import _tune_gc

SIZES = (10, 1_000, 10_000, 100_000)
V4_PREFIXES = (16, 20, 22, 24, 26, 28, 32)
V6_PREFIXES = (32, 48, 56, 64)


@dataclass
class Rules:
    exact: list[str]
    sub: list[str]
    apex: list[str]
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    yaml: str


def make_rules(n: int, rng: random.Random) -> Rules:
    exact: list[str] = []
    sub: list[str] = []
    apex: list[str] = []
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    seen_nets: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    lines = ["version: 1", "mode: enforce", "destinations:"]
    for d in range(max(1, n // 10)):
        hosts: list[str] = []
        for k in range(10):
            i = d * 10 + k
            kind = k % 5  # 0,1 exact; 2 sub; 3 apex_sub; 4 cidr
            if kind in (0, 1):
                h = f"api{i}.svc{i % 997}.example{i % 89}.com"
                exact.append(h)
                hosts.append(h)
            elif kind == 2:
                h = f"s{i}.zone{i % 991}.example{i % 83}.net"
                sub.append(h)
                hosts.append(f'"*.{h}"')
            elif kind == 3:
                h = f"a{i}.corp{i % 983}.example{i % 79}.org"
                apex.append(h)
                hosts.append(f'"**.{h}"')
            else:
                while True:
                    if rng.random() < 0.8:
                        p = rng.choice(V4_PREFIXES)
                        addr = ipaddress.IPv4Address(rng.getrandbits(32))
                        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
                            (addr, p), strict=False
                        )
                    else:
                        p = rng.choice(V6_PREFIXES)
                        addr6 = ipaddress.IPv6Address((0x2001 << 112) | rng.getrandbits(112))
                        net = ipaddress.IPv6Network((addr6, p), strict=False)
                    if net not in seen_nets:
                        break
                seen_nets.add(net)
                nets.append(net)
                hosts.append(str(net))
        lines += [
            f"  - name: d{d}",
            f"    hosts: [{', '.join(hosts)}]",
            "    ports: [443]",
        ]
    lines += ["deny:", '  - hosts: ["**.evil.example", "203.0.113.0/24"]']
    return Rules(exact, sub, apex, nets, "\n".join(lines) + "\n")


def make_queries(r: Rules, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(host, port) as a CONNECT would carry them: 30% exact, 20% under ``*.``, 20% under
    ``**.`` (half apex), 15% IP literals inside a CIDR, 15% misses."""
    out: list[tuple[str, str]] = []
    for j in range(count):
        x = rng.random()
        if x < 0.30:
            h = rng.choice(r.exact)
        elif x < 0.50:
            h = f"h{j}.{rng.choice(r.sub)}"
        elif x < 0.70:
            base = rng.choice(r.apex)
            h = base if j % 2 else f"w{j}.x.{base}"
        elif x < 0.85:
            net = rng.choice(r.nets)
            ip = net.network_address + rng.randrange(
                net.num_addresses if net.num_addresses < 2**32 else 2**32
            )
            h = str(ip)
        else:
            h = f"m{j}.nomatch{j % 101}.example.io"
        out.append((h, "443"))
    return out


def _rate(fn, queries: list[tuple[Any, Any]], seconds: float) -> float:  # type: ignore[no-untyped-def]
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for h, p in queries:
            fn(h, p)
        done += len(queries)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


@dataclass
class Row:
    rules: int
    load_s: float
    compile_s: float
    matcher_per_s: float
    decide_per_s: float
    hits_per_s: float
    misses_per_s: float
    index_per_s: float
    allowed_share: float
    #: Engine.decide(Target(...)) on the mix (0 in results saved before it was measured)
    entry_per_s: float = 0.0


@dataclass
class _Case:
    n: int
    engine: Engine
    load_s: float
    compile_s: float
    queries: list[tuple[str, str]]
    #: the same targets normalised, as the matcher is given them
    normalized: list[tuple[Host, int]]
    hits: list[tuple[str, str]]
    misses: list[tuple[str, str]]
    names: list[tuple[str, str]]
    allowed_share: float


def _build(n: int, seed: int = 1) -> _Case:
    return _build_all((n,), seed)[0]


def _build_all(sizes: tuple[int, ...], seed: int = 1) -> list[_Case]:
    """Every size's queries first, then every size's policy and Engine.

    The order matters to what is measured. The queries are 20k objects per size
    (tuple, Host, string), walked in order on every pass. Made in a fresh heap they lie
    side by side, and the CPU's prefetcher streams them in; made after a policy load
    they fill the holes the loader's garbage left all over the heap, and each one is a
    cache miss. Built per size as before (10 rules first, 10k after the 10-rule and
    1k-rule loads), that alone made the miss case, which does the same work at every
    size (its last label is in no rule), 1.5 times slower at 10k rules than at 10: the
    benchmark's own inputs, not the matcher. A proxy's targets are made by the
    normaliser just before the decision and are in cache.
    """
    inputs = []
    for n in sizes:
        rng = random.Random(seed)
        rules = make_rules(n, rng)
        queries = make_queries(rules, 20_000, rng)
        inputs.append(
            (n, rules, queries, [(normalize_host(h), normalize_port(p)) for h, p in queries])
        )
    catalog = load_catalog()
    cases = []
    for n, rules, queries, normalized in inputs:
        t0 = time.perf_counter()
        policy = load_policy_text(rules.yaml, f"bench-{n}.yaml")
        t1 = time.perf_counter()
        eng = Engine(policy, catalog)
        t2 = time.perf_counter()
        allowed = sum(isinstance(decide_target(eng.compiled, h, p), Match) for h, p in queries)
        cases.append(
            _Case(
                n,
                eng,
                t1 - t0,
                t2 - t1,
                queries,
                normalized=normalized,
                hits=[q for q in queries if not q[0].startswith("m")],
                misses=[q for q in queries if q[0].startswith("m")],
                names=[(h, "") for h, _ in queries if not h[0].isdigit() and ":" not in h],
                allowed_share=allowed / len(queries),
            )
        )
    return cases


def _asking(eng: Engine):  # type: ignore[no-untyped-def]
    """``Engine.decide`` as the proxy asks it for a CONNECT: one Target built per call."""
    decide = eng.decide

    def ask(raw_host: str, raw_port: str):  # type: ignore[no-untyped-def]
        return decide(Target(raw_host, raw_port))

    return ask


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run(sizes: tuple[int, ...] = SIZES, seconds: float = 1.5, rounds: int = 3) -> list[Row]:
    """Build every size first, then measure in interleaved rounds (median per size), so a
    burst of other load on the machine does not land on one size only."""
    cases = _build_all(sizes)
    # The collector as `egress-guard run` sets it (master._tune_gc): the policy frozen out
    # of its way, the young generation collected less often. Without this, each gen-2 pass
    # walks every object of the 100k-rule policy, which the proxy never does.
    threshold = gc.get_threshold()
    _tune_gc()
    try:
        return _measure(cases, seconds, rounds)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _measure(cases: list[_Case], seconds: float, rounds: int) -> list[Row]:
    samples: dict[int, dict[str, list[float]]] = {
        c.n: {"matcher": [], "mix": [], "hit": [], "miss": [], "idx": [], "entry": []}
        for c in cases
    }
    slot = seconds / rounds
    for r in range(rounds):
        for c in cases[r % len(cases) :] + cases[: r % len(cases)]:
            s = samples[c.n]
            index = c.engine.compiled.allow  # the HostIndex alone: no normalisation, no Decision
            matcher = partial(decide_name, c.engine.compiled)
            by_name = partial(decide_target, c.engine.compiled)
            s["matcher"].append(_rate(matcher, c.normalized, slot))
            s["mix"].append(_rate(by_name, c.queries, slot))
            s["hit"].append(_rate(by_name, c.hits, slot / 2))
            s["miss"].append(_rate(by_name, c.misses, slot / 2))
            s["entry"].append(_rate(_asking(c.engine), c.queries, slot))
            s["idx"].append(_rate(lambda h, _p, ix=index: ix.match_name(h), c.names, slot / 2))
    return [
        Row(
            c.n,
            c.load_s,
            c.compile_s,
            _median(samples[c.n]["matcher"]),
            _median(samples[c.n]["mix"]),
            _median(samples[c.n]["hit"]),
            _median(samples[c.n]["miss"]),
            _median(samples[c.n]["idx"]),
            c.allowed_share,
            _median(samples[c.n]["entry"]),
        )
        for c in cases
    ]


def markdown(rows: list[Row]) -> str:
    mbase = rows[0].matcher_per_s
    base = rows[0].decide_per_s
    ibase = rows[0].index_per_s
    out = [
        "| rules | policy load | Engine build | matcher decisions/s (mix) | vs 10 rules "
        "| decide_target/s (mix) | vs 10 rules | hits/s "
        "| misses/s | HostIndex.match_name/s | vs 10 rules | allowed share "
        "| decide(Target)/s (mix) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.rules:,} | {r.load_s:.2f} s | {r.compile_s:.2f} s "
            f"| {r.matcher_per_s:,.0f} | {r.matcher_per_s / mbase:.2f}× | {r.decide_per_s:,.0f} "
            f"| {r.decide_per_s / base:.2f}× | {r.hits_per_s:,.0f} | {r.misses_per_s:,.0f} "
            f"| {r.index_per_s:,.0f} | {r.index_per_s / ibase:.2f}× | {r.allowed_share:.0%} "
            f"| {r.entry_per_s:,.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--seconds", type=float, default=1.5, help="measuring time per size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--json", action="store_true", help="print the rows as JSON (for python -m bench)"
    )
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="measure the candidate not adopted (a decision cache)",
    )
    a = ap.parse_args()
    if a.candidates:
        print(candidates())
        return
    rows = run(tuple(int(s) for s in a.sizes.split(",")), a.seconds, a.rounds)
    print(json.dumps([dataclasses.asdict(r) for r in rows]) if a.json else markdown(rows))


def run_isolated(sizes: tuple[int, ...], seconds: float, rounds: int) -> list[Row]:
    """``run`` in a process of its own, as ``python -m bench`` calls it.

    A micro-benchmark measures the code, not the heap it lands in: run after the proxy
    rounds in the bench's own process, the policy's objects were spread through a heap
    the load generator had grown and fragmented (hundreds of thousands of latency
    samples), and the 10k-rule figure came out 10-20% lower than in a process of its own.
    The policy is built from YAML in the new process, as the proxy builds it at start-up.
    """
    argv = [sys.executable, "-m", "bench.matcher", "--json", "--sizes"]
    argv += [",".join(map(str, sizes)), "--seconds", str(seconds), "--rounds", str(rounds)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env, cwd=root)
    return [Row(**r) for r in json.loads(out.stdout)]


# -- candidate changes (measured here; nothing in egress_guard is changed) -----------------


def _make_cached(eng: Engine, limit: int):  # type: ignore[no-untyped-def]
    """decide_target behind a bounded per-Engine decision cache (cleared when full)."""
    cache: dict[tuple[str, str], object] = {}

    def decide_cached(raw_host: str, raw_port: str):  # type: ignore[no-untyped-def]
        key = (raw_host, raw_port)
        r = cache.get(key)
        if r is None:
            r = eng.decide(Target(raw_host, raw_port))
            if len(cache) >= limit:
                cache.clear()
            cache[key] = r
        return r

    return decide_cached


def candidates(sizes: tuple[int, ...] = (10, 10_000), seconds: float = 1.0) -> str:
    """The one candidate not adopted: a decision cache. (The fast path for plain host
    spellings measured here before is now in egress_guard.normalize.)"""
    out = [
        "| rules | decide_target (now) | + decision cache, cold "
        "(20k distinct targets, 4096 entries) | + decision cache, hot (50 targets) |",
        "|---:|---:|---:|---:|",
    ]
    for n in sizes:
        c = _build(n)
        hot = c.queries[:50]
        now = _rate(_asking(c.engine), c.queries, seconds)
        cold = _rate(_make_cached(c.engine, 4096), c.queries, seconds)
        hot_r = _rate(_make_cached(c.engine, 4096), hot, seconds)
        out.append(
            f"| {n:,} | {now:,.0f} | {cold:,.0f} ({cold / now:.2f}×) "
            f"| {hot_r:,.0f} ({hot_r / now:.2f}×) |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
