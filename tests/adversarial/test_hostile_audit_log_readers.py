"""The audit log's readers (``tail``, ``audit summary|verify|learn``) on a file someone
else wrote: a local user who can write a file an operator will read, or a log left
behind on a shared machine. Each must answer in bounded time, in one line at most, and
never print raw terminal control bytes.

* a line nested thousands deep (``[[[[...``): ``json.loads`` raises RecursionError, not
  ValueError; every reader crashed with a traceback, and a guard whose existing log ends
  in such a line could not read its chain back (``chain.read_tail``);
* a record whose ``port`` is a string with an escape sequence: ``tail`` printed it raw
  (every other field was escaped), so ``ESC ]0;...BEL`` retitled the terminal;
* one very long line without a newline: ``tail`` re-split its whole buffer on every
  64 KiB read (quadratic: 32 MiB took 15 s, 64 MiB a minute) and held it whole;
* an "audit log" that is a symlink to ``/dev/zero``: ``audit summary`` read one endless
  line into memory (24 GB in 2.5 minutes, deaf to Ctrl-C) and ``tail`` spun forever;
* a FIFO with no writer: ``tail`` hung in ``open()``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest
from support.proxy import EGRESS_GUARD

from egress_guard.cli import tail as tail_cli
from egress_guard.sinks.audit.chain import read_tail

DEEP = b"[" * 100_000 + b"]" * 100_000


#: address space a reader may take here: a reader that holds an endless line fails
#: (MemoryError) instead of taking the machine's memory
LIMIT_AS = 1536 * 1024 * 1024


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS_GUARD, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=_limit,
    )


def record(**fields: object) -> bytes:
    base: dict[str, object] = {
        "seq": 1,
        "prev": "0" * 64,
        "event": "decision",
        "decision": "block",
        "host": "evil.example",
        "port": 443,
        "reason": "not_allowlisted",
    }
    base.update(fields)
    return json.dumps(base).encode() + b"\n"


@pytest.mark.parametrize(
    "argv",
    [
        ("tail", "--no-follow"),
        ("audit", "summary"),
        ("audit", "summary", "--by", "user"),
        ("audit", "verify"),
        ("audit", "learn"),
    ],
)
def test_deeply_nested_line_is_no_crash(tmp_path: Path, argv: tuple[str, ...]) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(record() + DEEP + b"\n")
    r = run(*argv, str(log))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "RecursionError" not in r.stderr + r.stdout


def test_guard_reads_its_chain_back_past_a_deeply_nested_last_line(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(record() + DEEP + b"\n")
    tail = read_tail(str(log))
    assert tail is not None and tail.seq == 1


def test_tail_escapes_a_port_that_is_not_a_number(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(record(port="\x1b]0;PWNED\x07\x1b[2J\r\nfake line"))
    r = run("tail", "--no-follow", str(log))
    assert r.returncode == 0, r.stderr
    for raw in ("\x1b", "\x07", "\r"):
        assert raw not in r.stdout
    assert len(r.stdout.splitlines()) == 1
    assert "\\x1b]0;PWNED" in r.stdout


def test_tail_reads_a_huge_line_in_linear_time(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with log.open("wb") as f:
        f.write(record())
        f.write(b"x" * (48 * 1024 * 1024))  # no newline: one line 48 MiB long
        f.write(b"\n")
        f.write(record(seq=2, host="after.example"))
    started = time.monotonic()
    r = run("tail", "--no-follow", str(log), timeout=120)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert "evil.example" in r.stdout and "after.example" in r.stdout
    assert took < 10, f"tail took {took:.1f}s over one 48 MiB line"


def test_follower_never_holds_more_than_one_line_bound(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    bound = tail_cli.MAX_LINE
    log.write_bytes(b"y" * (3 * bound) + b"\n" + record())
    f = tail_cli.Follower(str(log))
    try:
        lines = list(f.lines())
    finally:
        f.close()
    assert len(lines) == 2
    assert all(len(line) <= bound for line in lines)
    assert json.loads(lines[1])["host"] == "evil.example"


@pytest.mark.parametrize("by", [(), ("--by", "user")])
def test_summary_escapes_every_name_and_time_it_prints(tmp_path: Path, by: tuple[str, ...]) -> None:
    """``--by user`` escaped its names; the default tables (destinations, blocked hosts,
    reasons) and the times printed them raw: ``ESC [2J`` cleared the operator's screen."""
    log = tmp_path / "audit.jsonl"
    log.write_bytes(
        record(
            ts="2026\x1b]0;T\x07",
            host="h\x1b[2J.example",
            reason="r\x1b[31m",
            destination="d\u202eevil",
            user="u\x1b[5m",
        )
    )
    r = run("audit", "summary", *by, str(log))
    assert r.returncode == 0, r.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in r.stdout, (raw, r.stdout)


@pytest.mark.parametrize(
    "argv",
    [
        ("tail", "--no-follow"),
        ("tail",),
        ("audit", "summary"),
        ("audit", "verify"),
        ("audit", "learn"),
    ],
)
def test_a_log_that_is_dev_zero_is_refused(tmp_path: Path, argv: tuple[str, ...]) -> None:
    log = tmp_path / "audit.jsonl"
    log.symlink_to("/dev/zero")
    try:
        r = run(*argv, str(log), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv} read /dev/zero for 20 s")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tail_of_a_fifo_without_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    try:
        r = run("tail", "--no-follow", str(fifo), timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("tail hung opening a FIFO")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_summary_reads_a_piped_log(tmp_path: Path) -> None:
    """Refusing devices does not refuse pipes (``audit summary <(zcat log.gz)``)."""
    r = subprocess.run(
        ["bash", "-c", f"{EGRESS_GUARD} audit summary <(printf '%s' \"$0\")", record().decode()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "evil.example" in r.stdout
