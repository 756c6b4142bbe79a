"""``egress-guard tail``: a real proxy writes (and rotates) its audit log while a real
``tail`` process follows it; every decision is printed once, in order, as one line."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from pathlib import Path

from support.clients import curl
from support.policies import make_policy
from support.proxy import EGRESS_GUARD, ProxyFactory
from support.upstream import Upstream

from egress_guard.sinks.audit.read import iter_records, order_files


class TailProcess:
    """``egress-guard tail`` as a child, its stdout read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [EGRESS_GUARD, "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def read(self, count: int, timeout: float = 20.0) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                out.append(self.lines.get(timeout=0.1))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def decisions(audit_path: Path) -> list[dict[str, object]]:
    files = order_files(sorted(str(p) for p in audit_path.parent.glob(audit_path.name + "*")))
    return [r.obj for r in iter_records(files) if r.obj.get("event") == "decision"]


def test_tail_follows_across_rotation(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    port = http_upstream.port
    # a few records per file: the log rotates several times while tail follows it
    p = proxy(make_policy(port), "--audit-max-bytes", "2000", "--audit-backups", "100")
    curl(p.url, f"http://other.test:{port}/first")
    p.wait_audit(lambda r: r["path"] == "/first")
    tail = TailProcess(str(p.audit_path), "-n", "1")
    try:
        first = tail.read(1)  # tail has read the log: it follows it from here
        assert len(first) == 1 and "/first" in first[0], first
        sent = 0
        # a burst: the log rotates several times between two of tail's looks
        for i in range(12):
            host = "api.test" if i % 4 == 0 else "other.test"
            curl(p.url, f"http://{host}:{port}/n{i}")
            sent += 1
        lines = tail.read(sent)
        time.sleep(0.5)
        assert tail.lines.empty(), "a decision printed twice"
    finally:
        tail.stop()
    assert Path(f"{p.audit_path}.2").exists(), "the log did not rotate"
    recs = decisions(p.audit_path)[1:]
    assert len(recs) == sent
    assert len(lines) == sent, (lines, tail.proc.stderr.read() if tail.proc.stderr else "")
    for line, rec in zip(lines, recs, strict=True):
        action = str(rec["decision"]).upper()
        assert line.startswith(f"{rec['ts']} {action} GET {rec['host']}:{port}/"), (line, rec)
        assert line.split(f":{port}")[1].split()[0] == rec["path"]
    assert sum(" BLOCK " in ln for ln in lines) == 9
    assert all("not_allowlisted" in ln for ln in lines if " BLOCK " in ln)


def test_tail_blocks_json_and_last_n(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    port = http_upstream.port
    p = proxy(make_policy(port))
    for i in range(6):
        curl(p.url, f"http://{'api.test' if i % 2 else 'other.test'}:{port}/j{i}")
    p.wait_audit(lambda r: True, count=6)
    res = subprocess.run(
        [EGRESS_GUARD, "tail", str(p.audit_path), "--blocks", "--json", "--no-follow", "-n", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    blocks = [r for r in decisions(p.audit_path) if r["decision"] == "block"]
    assert got == blocks[-2:]
    assert [r["path"] for r in got] == ["/j2", "/j4"]


def test_tail_escapes_what_the_log_quotes(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    rec = {
        "ts": "2026-01-31T12:00:00.000Z",
        "seq": 1,
        "event": "decision",
        "host": "evil\u001b]0;owned\u0007\u202e.test",
        "port": 443,
        "decision": "block",
        "reason": "invalid_host",
        "prev": "0" * 64,
    }
    log.write_text(json.dumps(rec) + "\n")
    res = subprocess.run(
        [EGRESS_GUARD, "tail", str(log), "--no-follow"], capture_output=True, timeout=30
    )
    assert res.returncode == 0
    out = res.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert out == (
        "2026-01-31T12:00:00.000Z BLOCK evil\\x1b]0;owned\\x07\\u202e.test:443 invalid_host\n"
    )


def test_tail_bad_input_is_one_line(tmp_path: Path) -> None:
    notlog = tmp_path / "notes.txt"
    notlog.write_text("hello\nworld\n")
    for target, words in (
        (str(tmp_path / "missing.log"), "cannot read"),
        (str(notlog), "not an audit log"),
        (str(tmp_path), "is a directory"),
    ):
        res = subprocess.run(
            [EGRESS_GUARD, "tail", target, "--no-follow"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 2
        assert res.stderr.count("\n") == 1 and words in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
