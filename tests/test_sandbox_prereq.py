"""``egress-guard sandbox`` where it cannot make its namespace: one line saying what is
missing, exit 2, and COMMAND never runs (it would run unguarded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_guard.cli.app import main


def test_without_root_one_line_and_the_command_never_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    marker = tmp_path / "ran"
    rc = main(["sandbox", "--confdir", str(tmp_path), "--", "touch", str(marker)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "needs root" in err, err
    assert not marker.exists()


def test_without_nft_it_says_which_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    real = __import__("shutil").which
    monkeypatch.setattr("shutil.which", lambda name: None if name == "nft" else real(name))
    rc = main(["sandbox", "--confdir", str(tmp_path), "--", "true"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "`nft` is not installed (apt-get install nftables)" in err, err
