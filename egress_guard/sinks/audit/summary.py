"""``audit summary``: per destination and per blocked host (or, ``--by user``, per
proxy user), counts by decision, bytes, first/last seen; as a dict (``--json``, which
holds every view) or as tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from egress_guard.normalize import join_hostport
from egress_guard.sinks.audit.read import Record, as_int
from egress_guard.sinks.logsafe import escape

DECISIONS = ("allow", "block", "would_block")
#: the views ``render_summary`` can print
VIEWS = ("destination", "user")


def _counts() -> dict[str, Any]:
    return {
        **dict.fromkeys(DECISIONS, 0),
        "connections": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "first_seen": None,
        "last_seen": None,
    }


def _count(entry: dict[str, Any], o: Mapping[str, Any], ev: object) -> None:
    """One decision or close record into a row's counts."""
    _seen(entry, o.get("ts"))
    if ev == "close":
        entry["connections"] += 1
        entry["bytes_up"] += as_int(o.get("bytes_up"))
        entry["bytes_down"] += as_int(o.get("bytes_down"))
    elif o.get("decision") in DECISIONS:
        entry[str(o.get("decision"))] += 1


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
    users: dict[str | None, dict[str, Any]] = {}
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
        _count(dests.setdefault(str(label), _counts()), o, ev)
        user = o.get("user")
        # records written before the field existed, and those of no proven user: None
        key_user = user if isinstance(user, str) else None
        u = users.setdefault(key_user, {"user": key_user, **_counts(), "destinations": set()})
        _count(u, o, ev)
        u["destinations"].add(str(label))
        if ev == "close":
            continue
        decision = o.get("decision")
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
        # no user (None) last; each user's destinations as a sorted list
        "users": [
            {**u, "destinations": sorted(u["destinations"])}
            for _, u in sorted(users.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
        ],
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    # every cell escaped (``logsafe.escape``): names, hosts, reasons and times come from
    # a file, and a terminal must not act on what it holds
    cells = [[str(h) for h in header]] + [
        ["-" if c is None else escape(str(c)) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def render_summary(s: Mapping[str, Any], by: str = "destination") -> str:
    """Tables for people: per destination and per blocked host, or (``by="user"``) per
    proxy user. Names from the log are escaped (a user name is the operator's, but a
    log file is input)."""
    out = [
        escape(
            f"{s['events']} events from {s['first_seen'] or '-'} to {s['last_seen'] or '-'}; "
            f"{s['startups']} start(s); policy loads: {s['policy_loads']['ok']} ok, "
            f"{s['policy_loads']['error']} failed; events lost: {s['dropped']}"
        ),
        "",
    ]
    if by == "user":
        return "\n".join(out + _user_table(s["users"])) + "\n"
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


def _user_table(users: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            "-" if u["user"] is None else escape(u["user"], keep_newlines=False),
            u["allow"],
            u["block"],
            u["would_block"],
            u["connections"],
            u["bytes_up"],
            u["bytes_down"],
            ",".join(escape(d) for d in u["destinations"]),
            u["first_seen"],
            u["last_seen"],
        ]
        for u in users
    ]
    header = ["USER", "ALLOW", "BLOCK", "WOULD_BLOCK", "CONNS", "BYTES_UP", "BYTES_DOWN"]
    table = _table([*header, "DESTINATIONS", "FIRST_SEEN", "LAST_SEEN"], rows)
    return [*table, "", "(- : no proven proxy user: no clients.auth, or its password check failed)"]
