"""A policy source that is not a regular file must not wedge the guard.

Before: ``open()`` of a FIFO blocks until a writer appears, and a character device such
as ``/dev/zero`` never ends. A FIFO (or a symlink swapped to one, as a ConfigMap's
``..data`` link is swapped) at the policy path hung the reload thread while it held the
reload lock: every later reload waited behind it, and the worker thread kept SIGTERM
from stopping the process. Now every file the loader reads (policy, users_file, the
catalog and presets) is opened without blocking, checked with ``fstat`` to be a regular
file, and read with a bound; anything else is refused with the file's name and "not a
regular file", and the policy in force stays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.clients import connect
from support.policies import make_policy
from support.ports import free_port
from support.proxy import EGRESS_GUARD, ProxyFactory, ProxyProcess
from support.upstream import Upstream

from egress_guard.policy import PolicyError, load_catalog, load_policy


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def status_of(p: ProxyProcess, authority: str) -> int:
    sock, resp = connect(p.port, authority)
    sock.close()
    return resp.status


def with_other(port: int) -> str:
    return make_policy(port).replace("hosts: [api.test]", "hosts: [api.test, other.test]")


def swap_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a ConfigMap-style swap)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def stops_within(p: ProxyProcess, seconds: float) -> bool:
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    try:
        p.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


# -- the loader itself ----------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "fifo-symlink", "dev-zero-symlink", "directory"])
def test_loader_refuses_non_regular_policy(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "policy.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo-symlink":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    elif kind == "dev-zero-symlink":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(path) in e.value.render()
    assert "not a regular file" in e.value.render()


@pytest.mark.timeout(20)
def test_users_file_fifo_refused(tmp_path: Path) -> None:
    """The users_file is read on every (re)load too: a FIFO there is refused the same
    way, by the loader's check and by the read itself (a link swapped in between)."""
    from egress_guard.proxy.reload import read_users as _read_users

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "users.txt").write_text("u:p\n")
    users = tmp_path / "users"
    users.symlink_to(tmp_path / "pipe")
    text = make_policy(443, extra="clients:\n  auth:\n    users_file: users\n")
    (tmp_path / "policy.yaml").write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path / "policy.yaml")
    assert "users" in e.value.render() and "not a regular file" in e.value.render()

    swap_link(users, tmp_path / "users.txt")
    policy = load_policy(tmp_path / "policy.yaml")
    swap_link(users, tmp_path / "pipe")  # swapped between the check and the read
    with pytest.raises(PolicyError) as e:
        _read_users(policy)
    assert "users" in e.value.render() and "not a regular file" in e.value.render()


@pytest.mark.timeout(20)
def test_catalog_fifo_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    os.mkfifo(catalog)
    with pytest.raises(PolicyError) as e:
        load_catalog(catalog)
    assert "not a regular file" in e.value.render()


@pytest.mark.timeout(20)
def test_file_growing_past_the_bound_is_refused(tmp_path: Path) -> None:
    """The size bound holds on what is read, not only on what stat said."""
    from egress_guard.policy.loader import MAX_FILE_BYTES

    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n" + "#" * (MAX_FILE_BYTES + 10) + "\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert "larger than" in e.value.render()


# -- the real proxy ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_fifo_at_start_up_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "policy.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    for argv in (
        ["run", "--listen", f"127.0.0.1:{free_port()}", "--confdir", str(tmp_path / "conf")],
        ["validate"],
        ["check"],
    ):
        args = [*argv, "--policy", str(path)] if argv[0] != "validate" else [*argv, str(path)]
        if argv[0] == "check":
            args.append("api.test")
        res = subprocess.run(
            [EGRESS_GUARD, *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 2, (argv[0], res.returncode, res.stderr)
        assert "not a regular file" in res.stderr, res.stderr
        assert str(path) in res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_symlink_swapped_to_fifo_on_reload(
    proxy: ProxyFactory, tls_upstream: Upstream, tmp_path: Path, kind: str
) -> None:
    """ConfigMap-style: the policy path is a symlink; it is swapped to a FIFO (or to
    /dev/zero). The reload is refused, the old policy stays, a later valid swap is
    loaded (the reload lock is free), and SIGTERM still stops the proxy promptly."""
    port = tls_upstream.port
    data = tmp_path / "data"
    data.mkdir()
    good = data / "v1.yaml"
    good.write_text(make_policy(port))
    link = tmp_path / "policy-link.yaml"
    link.symlink_to(good)
    p = proxy(None, "--policy", str(link))
    api, other = f"api.test:{port}", f"other.test:{port}"
    assert status_of(p, api) == 200 and status_of(p, other) == 403

    if kind == "fifo":
        bad = data / "pipe"
        os.mkfifo(bad)
    else:
        bad = Path("/dev/zero")
    swap_link(link, bad)
    p.signal(signal.SIGHUP)  # and the watcher sees it too: two reloads, neither may hang
    assert eventually(lambda: "not a regular file" in p.log()), p.log()
    assert status_of(p, api) == 200  # the old policy stays
    assert status_of(p, other) == 403
    errors = p.wait_audit(lambda r: r.get("result") == "error", event="policy_loaded")
    assert errors and "not a regular file" in errors[-1]["error"]

    newer = data / "v2.yaml"
    newer.write_text(with_other(port))
    swap_link(link, newer)
    assert eventually(lambda: status_of(p, other) == 200), p.log()

    # once more onto the FIFO, then stop: shutdown must not wait on a blocked read
    swap_link(link, bad)
    p.signal(signal.SIGHUP)
    assert eventually(lambda: p.log().count("not a regular file") >= 2), p.log()
    assert stops_within(p, 12), "SIGTERM did not stop the proxy"
