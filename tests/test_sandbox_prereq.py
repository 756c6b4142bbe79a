"""``egress-guard sandbox`` where it cannot make its namespace: one line saying what is
missing, exit 2, and COMMAND never runs (it would run unguarded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_guard.cli.app import main


def test_without_user_namespaces_one_line_and_the_command_never_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Not root, and the kernel refuses an unprivileged user namespace (the forked child
    shares this process's patched os.unshare)."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/sbin/{name}")  # ip, nft: "there"

    def refused(flags: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.unshare", refused)
    marker = tmp_path / "ran"
    rc = main(["sandbox", "--confdir", str(tmp_path), "--", "touch", str(marker)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "unprivileged user namespaces are not allowed" in err, err
    assert "run egress-guard sandbox as root" in err
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
