"""Audit tampering: ``egress-guard audit verify`` finds every edit to a hash-chained log.

Edited fields and sequence numbers, deleted, swapped, inserted and truncated lines, and
a rotated set with a file missing are each named by file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.audit_sample import dec, edited_lines, run_verify
from support.rotated import rotated_set

from egress_guard.cli import app as cli
from egress_guard.sinks.audit import AuditLog


def test_verify_intact_log(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "verify", "--require-start", str(audit_sample)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 14 lines in 1 file(s), seq 1..14, head ")


def test_verify_missing_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["audit", "verify", str(tmp_path / "nope.log")]) == 2


@pytest.mark.parametrize("lineno", [2, 7, 13])
def test_verify_names_the_edited_line(
    audit_sample: Path, capsys: pytest.CaptureFixture[str], lineno: int
) -> None:
    with edited_lines(audit_sample) as lines:
        obj = json.loads(lines[lineno - 1])
        obj["ts"] = "2000-01-01T00:00:00.000Z"
        lines[lineno - 1] = json.dumps(obj, separators=(",", ":")).encode()
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1
    assert out.startswith(f"FAIL {audit_sample}:{lineno}: edited:"), out


def test_verify_edited_seq_field(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with edited_lines(audit_sample) as lines:
        lines[5] = lines[5].replace(b'"seq":6,', b'"seq":60,')
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1 and out.startswith(f"FAIL {audit_sample}:6: edited: seq is 60, expected 6"), out


def test_verify_names_a_deleted_line(
    audit_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with edited_lines(audit_sample) as lines:
        del lines[5:7]  # seq 6 and 7
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1
    assert out.startswith(f"FAIL {audit_sample}:6: deleted: 2 line(s) missing"), out


def test_verify_names_swapped_lines(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with edited_lines(audit_sample) as lines:
        lines[8], lines[9] = lines[9], lines[8]
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1
    assert out.startswith(f"FAIL {audit_sample}:9: reordered:"), out
    assert f"{audit_sample}:10" in out


def test_verify_truncated_last_line(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = audit_sample.read_bytes()
    audit_sample.write_bytes(data[:-20])
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1 and out.startswith(f"FAIL {audit_sample}:14: truncated:"), out


def test_verify_invalid_json_line(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with edited_lines(audit_sample) as lines:
        lines[3] = lines[3][:40]
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1 and out.startswith(f"FAIL {audit_sample}:4: invalid: not valid JSON"), out


def test_verify_inserted_line(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with edited_lines(audit_sample) as lines:
        lines.insert(3, lines[2])  # a replayed copy of line 3
    rc, out = run_verify(capsys, str(audit_sample))
    assert rc == 1 and out.startswith(f"FAIL {audit_sample}:4: reordered:"), out


def test_verify_rotated_set_with_a_file_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "audit.log"
    with AuditLog(p, max_bytes=1200, backups=20) as log:
        for i in range(20):
            log.decision(dec(i, "api.anthropic.com", 443, "allow", "allowlisted", "anthropic"))
    files = rotated_set(str(p))
    rc, out = run_verify(capsys, *files)
    assert rc == 0, out
    gone = files[2]
    Path(gone).unlink()
    rc, out = run_verify(capsys, *[f for f in files if f != gone])
    assert rc == 1
    assert out.startswith(f"FAIL {files[3]}:1: deleted:") and "rotated file missing" in out, out
