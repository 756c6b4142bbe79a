"""The interception CA is named for egress-guard, and ``run --inspect`` says at start-up
what it intercepts and which CA it uses.

Threat: a developer told to trust "mitmproxy" cannot tell the guard's CA from one an
attacker's interception tool made; an operator who cannot see which CA (and which
destinations) inspect mode uses cannot check what clients were given. A CA already in
the confdir is kept (clients trust it): the guard says when it is still mitmproxy's.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from support.clients import read_response
from support.hygiene import inspect_policy
from support.proxy import EGRESS_GUARD, ProxyFactory
from support.upstream import Upstream


def _export(confdir: Path) -> x509.Certificate:
    pem = subprocess.run(
        [EGRESS_GUARD, "ca", "export", "--confdir", str(confdir)],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return x509.load_pem_x509_certificate(pem)


def _names(name: x509.Name) -> dict[str, str]:
    return {
        "CN": str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value),
        "O": str(name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value),
    }


def test_ca_export_makes_a_ca_named_for_egress_guard(tmp_path: Path) -> None:
    cert = _export(tmp_path / "conf")
    assert _names(cert.subject) == {"CN": "egress-guard interception CA", "O": "egress-guard"}
    assert cert.issuer == cert.subject
    assert "mitmproxy" not in cert.subject.rfc4514_string().lower()
    # a second export hands out the same CA (it is made once)
    assert _export(tmp_path / "conf") == cert


def test_inspect_start_up_says_what_and_with_which_ca_and_leaves_are_issued_by_it(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, tmp_path: Path
) -> None:
    confdir = tmp_path / "fresh-conf"
    policy = inspect_policy(tls_upstream.port)
    p = proxy(policy, "--inspect", "--upstream-ca", str(ca_file), "--confdir", str(confdir))
    log = p.log()
    cert = _export(confdir)  # the CA run made (not a new one)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    (what,) = [line for line in log.splitlines() if "--inspect: TLS tunnels" in line]
    assert "to test-api are intercepted" in what  # api.test has methods/paths rules
    assert "private-api" not in what
    (which,) = [line for line in log.splitlines() if "interception CA" in line]
    assert str(confdir / "mitmproxy-ca-cert.pem") in which
    assert "CN=egress-guard interception CA" in which and fingerprint in which
    assert "made by mitmproxy" not in log

    # the certificate a client sees inside the tunnel is issued by that CA
    sock = socket.create_connection((p.host, p.port), timeout=10)
    try:
        target = f"api.test:{tls_upstream.port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert read_response(sock).status == 200
        ctx = ssl.create_default_context(cadata=cert.public_bytes(Encoding.PEM).decode())
        with ctx.wrap_socket(sock, server_hostname="api.test") as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    finally:
        sock.close()
    assert _names(leaf.issuer)["CN"] == "egress-guard interception CA"


def test_a_ca_mitmproxy_made_is_kept_and_named_at_start_up(
    proxy: ProxyFactory, tls_upstream: Upstream, tmp_path: Path
) -> None:
    from mitmproxy import certs

    confdir = tmp_path / "old-conf"
    confdir.mkdir()
    certs.CertStore.create_store(confdir, "mitmproxy", 2048)  # as mitmproxy makes it
    before = (confdir / "mitmproxy-ca.pem").read_bytes()
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--confdir", str(confdir))
    log = p.log()
    assert "CN=mitmproxy" in log and "made by mitmproxy" in log
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == before
