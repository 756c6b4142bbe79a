"""Hot reload: file changes, ConfigMap-style symlink swaps and SIGHUP; bad files change nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from support.clients import connect
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream


def status_of(p: ProxyProcess, authority: str) -> int:
    sock, resp = connect(p.port, authority)
    sock.close()
    return resp.status


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def with_other(port: int) -> str:
    return make_policy(port).replace("hosts: [api.test]", "hosts: [api.test, other.test]")


def test_valid_change_takes_effect_without_restart(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    other = f"other.test:{tls_upstream.port}"
    assert status_of(p, other) == 403
    write_atomic(p.policy_path, with_other(tls_upstream.port))
    assert eventually(lambda: status_of(p, other) == 200)
    loaded = p.wait_audit(lambda r: r.get("result") == "ok", event="policy_loaded", count=2)
    assert len(loaded) >= 2  # start-up and the reload


def test_broken_file_keeps_old_policy(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port))
    api, other = f"api.test:{tls_upstream.port}", f"other.test:{tls_upstream.port}"
    broken = with_other(tls_upstream.port).replace("ports: [", "portz: [", 1)
    write_atomic(p.policy_path, broken)
    assert eventually(lambda: "policy reload rejected" in p.log())
    assert "policy.yaml:" in p.log()  # the error names file:line
    assert status_of(p, api) == 200
    assert status_of(p, other) == 403  # the broken file's new entry did not sneak in
    errors = p.wait_audit(lambda r: r.get("result") == "error", event="policy_loaded")
    assert errors
    # a later good file is picked up again
    write_atomic(p.policy_path, with_other(tls_upstream.port))
    assert eventually(lambda: status_of(p, other) == 200)


def test_truncated_and_deleted_file_keep_old_policy(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    api = f"api.test:{tls_upstream.port}"
    p.policy_path.write_text("")
    assert eventually(lambda: p.log().count("policy reload rejected") >= 1)
    assert status_of(p, api) == 200
    p.policy_path.unlink()
    assert eventually(lambda: p.log().count("policy reload rejected") >= 2)
    assert status_of(p, api) == 200


def test_long_lived_tunnel_survives_reload(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    api = f"api.test:{tls_upstream.port}"
    sock, resp = connect(p.port, api)
    assert resp.status == 200
    import ssl

    from support.clients import read_response

    ctx = ssl.create_default_context(cafile=str(ca_file))
    tls = ctx.wrap_socket(sock, server_hostname="api.test")
    tls.sendall(b"GET /before HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert read_response(tls).status == 200  # type: ignore[arg-type]
    # The new policy no longer allows api.test at all.
    write_atomic(
        p.policy_path,
        make_policy(tls_upstream.port).replace("hosts: [api.test]", "hosts: [nothing.test]"),
    )
    assert eventually(lambda: status_of(p, api) == 403)
    tls.sendall(b"GET /after HTTP/1.1\r\nHost: api.test\r\n\r\n")
    assert read_response(tls).status == 200  # type: ignore[arg-type]
    tls.close()
    assert [r[1] for r in tls_upstream.seen.requests] == ["/before", "/after"]


def test_configmap_symlink_swap(
    proxy: ProxyFactory, tls_upstream: Upstream, tmp_path: Path
) -> None:
    """Kubernetes mounts policy.yaml -> ..data/policy.yaml and swaps ..data atomically."""
    mount = tmp_path / "configmap"
    v1, v2 = mount / "..2026_11_25_v1", mount / "..2026_11_25_v2"
    v1.mkdir(parents=True)
    v2.mkdir()
    (v1 / "policy.yaml").write_text(make_policy(tls_upstream.port))
    (v2 / "policy.yaml").write_text(with_other(tls_upstream.port))
    os.symlink(v1.name, mount / "..data")
    os.symlink("..data/policy.yaml", mount / "policy.yaml")
    p = proxy(None, "--policy", str(mount / "policy.yaml"))
    other = f"other.test:{tls_upstream.port}"
    assert status_of(p, other) == 403
    tmp_link = mount / "..data_tmp"
    os.symlink(v2.name, tmp_link)
    os.replace(tmp_link, mount / "..data")
    assert eventually(lambda: status_of(p, other) == 200)


def test_sighup_after_an_edit_loads_it_once(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    """An operator edits the file and sends SIGHUP: the watcher, which saw the edit too,
    must not load the same file a second time (one policy_loaded record, not two)."""
    p = proxy(make_policy(tls_upstream.port))
    loads = len(p.audit("policy_loaded"))
    final = with_other(tls_upstream.port)
    # keep the file changing for longer than a poll, so the watcher is waiting for it to
    # settle when the last write and the SIGHUP come
    for i in range(4):
        write_atomic(p.policy_path, final + "#" * (i + 1))
        time.sleep(0.3)
    write_atomic(p.policy_path, final)
    p.signal(signal.SIGHUP)
    assert eventually(lambda: p.log().count("policy file changed") >= 1), p.log()[-2000:]
    time.sleep(0.5)  # the watcher's reload, had it loaded again, would be written by now
    records = p.audit("policy_loaded")[loads:]
    assert [r["result"] for r in records] == ["ok"], records
    assert status_of(p, f"other.test:{tls_upstream.port}") == 200


def test_sighup_reloads(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    p = proxy(make_policy(tls_upstream.port))
    other = f"other.test:{tls_upstream.port}"
    old = make_policy(tls_upstream.port)
    new = with_other(tls_upstream.port)
    # Same size, same inode, same mtime: the file watcher cannot see this edit, only SIGHUP.
    new = new + "#" * (len(old) - len(new)) if len(new) < len(old) else new
    old_padded = old + "#" * (len(new) - len(old))
    write_atomic(p.policy_path, old_padded)
    assert eventually(lambda: p.log().count("policy file changed") >= 1)
    st = p.policy_path.stat()
    with p.policy_path.open("r+") as f:
        f.write(new)
    os.utime(p.policy_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(2.5)
    assert status_of(p, other) == 403  # the watcher did not notice
    p.signal(signal.SIGHUP)
    assert eventually(lambda: status_of(p, other) == 200)
    assert "SIGHUP" in p.log()
