"""The interception CA, named for egress-guard.

Inspect mode terminates TLS with a CA that mitmproxy keeps in the confdir; when the
confdir has none, mitmproxy makes one whose subject is ``CN=mitmproxy, O=mitmproxy``.
A certificate named for a general-purpose interception tool, in a developer's trust
store, is what a security team should not have to explain: it is made here first, with
the same file names (mitmproxy reads ``{confdir}/mitmproxy-ca.pem``, and keeps reading
it) but a subject that says what it is: ``CN=egress-guard interception CA,
O=egress-guard``. A CA already in the confdir is kept as it is (clients trust it
already); ``egress-guard run --inspect`` says at start-up which one is in use, and
whether it is still mitmproxy's.

Both ``egress-guard ca export`` and ``egress-guard run`` call ``ensure_ca`` before
mitmproxy looks at the confdir, so whichever runs first makes the CA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: mitmproxy's file names (its tlsconfig addon reads ``{confdir}/mitmproxy-ca.pem``)
CA_BASENAME: Final = "mitmproxy"
CA_ORGANIZATION: Final = "egress-guard"
CA_COMMON_NAME: Final = "egress-guard interception CA"
KEY_SIZE: Final = 2048


@dataclass(frozen=True, slots=True)
class InterceptionCA:
    """The CA in a confdir: its certificate (what clients must trust), its subject's
    common name and SHA-256 fingerprint, and whether this call made it."""

    #: the certificate alone (no key): the file to hand to clients
    cert_path: Path
    pem: bytes
    common_name: str
    sha256: str
    created: bool

    @property
    def is_mitmproxy_default(self) -> bool:
        """Made by mitmproxy itself (before egress-guard named its CA)."""
        return self.common_name == "mitmproxy"


def ensure_ca(confdir: str) -> InterceptionCA:
    """The confdir's interception CA, made (named for egress-guard) when there is none.
    Raises OSError when the confdir cannot be made or read."""
    from mitmproxy import certs  # imported here: about a second, and only these need it

    path = Path(os.path.expanduser(confdir)).absolute()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = False
    if not (path / f"{CA_BASENAME}-ca.pem").exists():
        certs.CertStore.create_store(
            path, CA_BASENAME, KEY_SIZE, organization=CA_ORGANIZATION, cn=CA_COMMON_NAME
        )
        created = True
    store = certs.CertStore.from_store(path, CA_BASENAME, KEY_SIZE)
    cert = store.default_ca
    pem = cert.to_pem()
    return InterceptionCA(
        cert_path=path / f"{CA_BASENAME}-ca-cert.pem",
        pem=pem,
        common_name=cert.cn or "",
        sha256=cert.fingerprint().hex(),
        created=created,
    )
