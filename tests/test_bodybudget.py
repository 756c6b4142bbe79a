"""The held-body budget's bookkeeping (egress_guard/proxy/bodybudget.py): limits, shares, and
that every way a body ends gives its bytes back (a leak would refuse everything later)."""

from __future__ import annotations

import random

import pytest

from egress_guard.engine.models import DEFAULT_MAX_MODEL_BODY
from egress_guard.proxy.bodybudget import (
    DEFAULT_MAX_HELD_BODIES,
    BodyBudget,
    MiB,
    client_share,
)


def test_default_share_is_a_quarter_and_fits_one_largest_body() -> None:
    share = client_share(DEFAULT_MAX_HELD_BODIES, DEFAULT_MAX_MODEL_BODY)
    assert share == DEFAULT_MAX_HELD_BODIES // 4 == DEFAULT_MAX_MODEL_BODY


@pytest.mark.parametrize(
    ("limit", "max_body", "share"),
    [
        (100, 10, 25),  # a quarter
        (100, 40, 40),  # at least one body of the largest size allowed
        (100, 400, 100),  # never more than the whole budget
        (3, 1, 1),
        (0, 10, 0),
    ],
)
def test_client_share(limit: int, max_body: int, share: int) -> None:
    assert client_share(limit, max_body) == share


def test_reserve_within_limits_and_release() -> None:
    b = BodyBudget(100, 50)
    assert b.reserve("f1", "c1", "10.0.0.1", 30) is None
    assert b.reserve("f2", "c2", "10.0.0.2", 50) is None
    assert (b.held, b.held_by("10.0.0.1"), b.held_by("10.0.0.2")) == (80, 30, 50)
    assert b.release("f1") == 30
    assert b.release("f1") == 0  # idempotent
    assert b.release("nope") == 0
    assert (b.held, b.held_by("10.0.0.1")) == (50, 0)
    assert b.release("f2") == 50
    assert b.held == 0 and len(b) == 0 and b.refused == 0


def test_global_limit_refuses_with_a_detail() -> None:
    b = BodyBudget(100, 100)
    assert b.reserve("a", "c1", "10.0.0.1", 60) is None
    why = b.reserve("b", "c2", "10.0.0.2", 41)
    assert why is not None and "--max-held-bodies (100)" in why
    assert b.refused == 1 and b.held == 60
    assert b.reserve("c", "c2", "10.0.0.2", 40) is None  # exactly full is fine
    assert b.held == 100


def test_per_client_share_counts_all_connections_of_an_address() -> None:
    b = BodyBudget(100, 25)
    assert b.reserve("a", "conn1", "10.0.0.1", 20) is None
    why = b.reserve("b", "conn2", "10.0.0.1", 10)  # another connection, same address
    assert why is not None and "share of 25" in why
    assert b.reserve("c", "conn3", "10.0.0.2", 25) is None  # another client is not affected
    assert b.refused == 1


def test_empty_bodies_take_nothing_and_a_key_is_reserved_once() -> None:
    b = BodyBudget(10, 10)
    assert b.reserve("a", "c", "x", 0) is None
    assert b.held == 0 and len(b) == 0
    assert b.reserve("a", "c", "x", 10) is None
    assert b.reserve("a", "c", "x", 10) is None  # the same body again: not twice
    assert b.held == 10
    assert b.release("a") == 10 and b.held == 0


def test_body_larger_than_the_budget_is_refused() -> None:
    b = BodyBudget(10, 10)
    assert b.reserve("a", "c", "x", 11) is not None
    assert b.held == 0


def test_release_connection_releases_only_its_bodies() -> None:
    b = BodyBudget(1000, 1000)
    for i in range(6):  # six HTTP/2 streams on one connection
        assert b.reserve(("h2", i), "h2", "10.0.0.1", 10) is None
    assert b.reserve(("other", 0), "other", "10.0.0.1", 10) is None
    b.release(("h2", 2))  # one stream ended on its own first
    assert b.release_connection("h2") == 50
    assert b.release_connection("h2") == 0
    assert (b.held, b.held_by("10.0.0.1")) == (10, 10)
    b.release_connection("other")
    assert b.held == 0 and len(b) == 0


def test_resize_keeps_what_is_held() -> None:
    b = BodyBudget(100, 100)
    assert b.reserve("a", "c", "x", 80) is None
    b.resize(50, 50)
    assert b.reserve("b", "c2", "y", 1) is not None  # over the new limit
    assert b.release("a") == 80 and b.held == 0
    assert b.reserve("b", "c2", "y", 50) is None


def test_any_interleaving_returns_to_zero() -> None:
    """Random reserve/release/connection-close sequences: the totals always equal the sum
    of what is reserved, never pass the limits, and end at zero."""
    rng = random.Random(17)
    for _ in range(200):
        b = BodyBudget(rng.randint(1, 64) * MiB, rng.randint(1, 64) * MiB)
        live: dict[tuple[int, int], tuple[int, str, int]] = {}
        for step in range(100):
            op = rng.random()
            conn, client = rng.randint(0, 5), f"10.0.0.{rng.randint(0, 3)}"
            if op < 0.5:
                key = (conn, step)
                size = rng.randint(0, 32) * MiB
                if b.reserve(key, conn, client, size) is None and size > 0:
                    live[key] = (conn, client, size)
            elif op < 0.8 and live:
                key = rng.choice(list(live))
                assert b.release(key) == live.pop(key)[2]
            else:
                b.release_connection(conn)
                live = {k: v for k, v in live.items() if v[0] != conn}
            assert b.held == sum(v[2] for v in live.values()) <= b.limit
            for c in {v[1] for v in live.values()}:
                assert b.held_by(c) == sum(v[2] for v in live.values() if v[1] == c)
                assert b.held_by(c) <= b.per_client
        for conn in range(6):
            b.release_connection(conn)
        assert b.held == 0 and len(b) == 0


# -- stalled reservations (heads alone, trickles) give way -------------------------------


def test_stalled_needs_the_grace_period_and_a_rate_below_the_floor() -> None:
    b = BodyBudget(100, 100)
    b.reserve("f", "c", "10.0.0.1", 50, now=10.0)
    held = b.get("f")
    assert held is not None
    assert not held.stalled(11.9, 2.0, 10)  # within the grace period
    assert held.stalled(12.1, 2.0, 10)  # 0 bytes after 2.1 s
    b.progress("f", 25, 12.0)
    assert (held.received, held.last) == (25, 12.0)
    assert not held.stalled(12.4, 2.0, 10)  # 25 bytes >= 10 B/s x 2.4 s
    assert held.stalled(2.6 + 10.0, 2.0, 10)  # 25 < 26
    b.progress("gone", 5, 13.0)  # not reserved: nothing


def test_evict_stalled_only_when_short_and_only_stalled() -> None:
    b = BodyBudget(100, 60)
    b.reserve("a", "c1", "10.0.0.1", 40, now=0.0, tag="flow-a")  # stalls
    b.reserve("b", "c2", "10.0.0.2", 40, now=0.0)
    b.progress("b", 40, 0.5)  # 40 bytes in 10 s: above 3 B/s
    assert b.evict_stalled("10.0.0.3", 20, 10.0, 2.0, 10) == []  # fits: nothing
    assert b.evict_stalled("10.0.0.3", 30, 10.0, 2.0, 0) == []  # eviction off
    assert b.evict_stalled("10.0.0.3", 30, 1.0, 2.0, 10) == []  # within grace
    out = b.evict_stalled("10.0.0.3", 30, 10.0, 2.0, 3)
    assert [(k, e.tag, e.size) for k, e in out] == [("a", "flow-a", 40)]
    assert (b.held, b.evicted, b.held_by("10.0.0.1"), len(b)) == (40, 1, 0, 1)
    assert b.reserve("n", "c3", "10.0.0.3", 30) is None
    assert b.release("a") == 0  # already released: the later hooks find nothing


def test_a_short_share_evicts_only_the_clients_own() -> None:
    b = BodyBudget(1000, 50)
    b.reserve("mine", "c1", "10.0.0.1", 40, now=0.0)
    b.reserve("other", "c2", "10.0.0.2", 40, now=0.0)  # stalled too, but not in the way
    out = b.evict_stalled("10.0.0.1", 20, 10.0, 2.0, 10)
    assert [k for k, _ in out] == ["mine"]
    assert b.get("other") is not None and b.held == 40
    # the budget short as well: every stalled one goes
    b2 = BodyBudget(80, 50)
    b2.reserve("mine", "c1", "10.0.0.1", 40, now=0.0)
    b2.reserve("other", "c2", "10.0.0.2", 40, now=0.0)
    assert sorted(k for k, _ in b2.evict_stalled("10.0.0.1", 20, 10.0, 2.0, 10)) == [
        "mine",
        "other",
    ]
    assert b2.held == 0


def test_progress_counting_fails_closed() -> None:
    """A reservation whose progress cannot be counted stays reserved (it only looks
    stalled); the count raises for what is not a reservation, and the patch logs it."""
    from types import SimpleNamespace

    from egress_guard.proxy.patches import heldprogress

    b = BodyBudget(100, 100)
    b.reserve("f", "c", "10.0.0.1", 50, now=0.0)
    flow = SimpleNamespace(metadata={heldprogress.PROGRESS: b.get("f")})
    heldprogress.count(flow, 7)
    assert b.get("f") is not None and b.get("f").received == 7  # type: ignore[union-attr]
    heldprogress.count(SimpleNamespace(metadata={}), 7)  # not held: nothing
    with pytest.raises(TypeError):
        heldprogress.count(SimpleNamespace(metadata={heldprogress.PROGRESS: 7}), 7)
    assert b.held == 50
