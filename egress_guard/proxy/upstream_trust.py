"""The CAs the guard trusts for upstream TLS (inspect mode, https:// parent proxies).

mitmproxy verifies upstream certificates against certifi's public roots, unless its
``ssl_verify_upstream_trusted_ca`` option names a file: then against that file alone.
Handing it an operator's corporate CA therefore *replaced* the public roots, and every
public provider failed in inspect mode. ``--upstream-ca`` adds: the guard writes a bundle
of certifi's roots plus the given CAs into the confdir and hands mitmproxy that.
``--upstream-ca-only`` is the explicit way to trust the given CAs and nothing else.

No mitmproxy import here: ``run`` checks the files before the proxy starts.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

import certifi

from egress_guard.policy import PolicyError
from egress_guard.policy.loader import read_regular_file

#: a CA file larger than this is not a CA file
MAX_CA_FILE_BYTES = 16 * 1024 * 1024


class UpstreamCAError(ValueError):
    """A CA file that cannot be used; the message names it."""


def default_roots() -> str:
    """The public roots mitmproxy trusts by default (certifi's bundle)."""
    return certifi.where()


def _read_ca(path: str) -> str:
    try:
        raw = read_regular_file(Path(path), "CA file", MAX_CA_FILE_BYTES)
    except PolicyError as e:
        raise UpstreamCAError(e.render()) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UpstreamCAError(f"{path}: not a PEM file (not UTF-8 text)") from None
    try:
        ssl.create_default_context().load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        raise UpstreamCAError(f"{path}: no usable PEM certificate ({e})") from None
    return text


def upstream_ca_bundle(confdir: str, add: Sequence[str], only: Sequence[str]) -> str | None:
    """The file mitmproxy should verify upstream certificates with, or None for its
    default (the public roots). ``add``: the public roots plus these CA files;
    ``only``: these CA files alone. Raises UpstreamCAError naming a bad file."""
    if not add and not only:
        return None
    if add and only:
        raise UpstreamCAError("give --upstream-ca or --upstream-ca-only, not both")
    parts = [_read_ca(p) for p in (add or only)]
    if add:
        roots = default_roots()
        try:
            parts.insert(0, read_regular_file(Path(roots), "CA file", MAX_CA_FILE_BYTES).decode())
        except (PolicyError, UnicodeDecodeError) as e:
            raise UpstreamCAError(f"cannot read the default roots {roots}: {e}") from None
    bundle = "".join(p if p.endswith("\n") else p + "\n" for p in parts).encode("utf-8")
    # Named by content: proxies sharing a confdir with different CAs do not overwrite
    # each other's bundle (mitmproxy reads it when it builds a TLS context).
    digest = hashlib.sha256(bundle).hexdigest()[:16]
    kind = "added" if add else "only"
    directory = Path(os.path.expanduser(confdir))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = directory / f"upstream-ca-{kind}-{digest}.pem"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".upstream-ca-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bundle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(target)
