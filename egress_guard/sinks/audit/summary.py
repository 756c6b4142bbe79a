"""``audit summary``: per destination and per blocked host, counts by decision, bytes,
first/last seen; as a dict (``--json``) or as tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from egress_guard.normalize import join_hostport
from egress_guard.sinks.audit.read import Record, as_int

DECISIONS = ("allow", "block", "would_block")


def _seen(entry: dict[str, Any], ts: object) -> None:
    if not isinstance(ts, str):
        return
    if entry["first_seen"] is None or ts < entry["first_seen"]:
        entry["first_seen"] = ts
    if entry["last_seen"] is None or ts > entry["last_seen"]:
        entry["last_seen"] = ts


def summarize(records: Iterable[Record]) -> dict[str, Any]:
    dests: dict[str, dict[str, Any]] = {}
    blocked: dict[tuple[str, int | None], dict[str, Any]] = {}
    total: dict[str, Any] = {"events": 0, "first_seen": None, "last_seen": None}
    loads = {"ok": 0, "error": 0}
    dropped = 0
    startups = 0
    for rec in records:
        o = rec.obj
        ev, ts = o.get("event"), o.get("ts")
        total["events"] += 1
        _seen(total, ts)
        if ev == "startup":
            startups += 1
        elif ev == "policy_loaded":
            loads["ok" if o.get("result") == "ok" else "error"] += 1
        elif ev == "dropped":
            dropped += as_int(o.get("count"))
        if ev not in ("decision", "close"):
            continue
        label = o.get("destination") or "unlisted"
        d = dests.setdefault(
            str(label),
            {
                **dict.fromkeys(DECISIONS, 0),
                "connections": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "first_seen": None,
                "last_seen": None,
            },
        )
        _seen(d, ts)
        decision = o.get("decision")
        if ev == "close":
            d["connections"] += 1
            d["bytes_up"] += as_int(o.get("bytes_up"))
            d["bytes_down"] += as_int(o.get("bytes_down"))
            continue
        if decision in DECISIONS:
            d[decision] += 1
        if decision in ("block", "would_block"):
            port = o.get("port")
            key = (str(o.get("host") or ""), port if isinstance(port, int) else None)
            b = blocked.setdefault(
                key,
                {
                    "host": key[0],
                    "port": key[1],
                    "block": 0,
                    "would_block": 0,
                    "reasons": {},
                    "first_seen": None,
                    "last_seen": None,
                },
            )
            b[decision] += 1
            reason = str(o.get("reason"))
            b["reasons"][reason] = b["reasons"].get(reason, 0) + 1
            _seen(b, ts)
    return {
        **total,
        "startups": startups,
        "policy_loads": loads,
        "dropped": dropped,
        "destinations": dict(sorted(dests.items())),
        "blocked_hosts": sorted(
            blocked.values(), key=lambda b: (-(b["block"] + b["would_block"]), b["host"])
        ),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def render_summary(s: Mapping[str, Any]) -> str:
    out = [
        f"{s['events']} events from {s['first_seen'] or '-'} to {s['last_seen'] or '-'}; "
        f"{s['startups']} start(s); policy loads: {s['policy_loads']['ok']} ok, "
        f"{s['policy_loads']['error']} failed; events lost: {s['dropped']}",
        "",
    ]
    dest_rows = [
        [
            name,
            d["allow"],
            d["block"],
            d["would_block"],
            d["connections"],
            d["bytes_up"],
            d["bytes_down"],
            d["first_seen"],
            d["last_seen"],
        ]
        for name, d in s["destinations"].items()
    ]
    out += _table(
        [
            "DESTINATION",
            "ALLOW",
            "BLOCK",
            "WOULD_BLOCK",
            "CONNS",
            "BYTES_UP",
            "BYTES_DOWN",
            "FIRST_SEEN",
            "LAST_SEEN",
        ],
        dest_rows,
    )
    out.append("")
    if s["blocked_hosts"]:
        rows = [
            [
                join_hostport(b["host"], b["port"]),
                b["block"],
                b["would_block"],
                ",".join(f"{r}={n}" for r, n in sorted(b["reasons"].items())),
                b["first_seen"],
                b["last_seen"],
            ]
            for b in s["blocked_hosts"]
        ]
        out += _table(
            ["BLOCKED HOST", "BLOCK", "WOULD_BLOCK", "REASONS", "FIRST_SEEN", "LAST_SEEN"], rows
        )
    else:
        out.append("no blocked hosts")
    return "\n".join(out) + "\n"
