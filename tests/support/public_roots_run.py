"""Run egress-guard with a test CA standing in for the public roots.

mitmproxy (and egress-guard's ``--upstream-ca`` bundle) take the public roots from
``certifi.where()``; here that names the PEM file in EG_TEST_PUBLIC_ROOTS, so a test can
have a loopback upstream that "a public CA" signed, without any real public server.
"""

from __future__ import annotations

import os
import sys

import certifi

roots = os.environ["EG_TEST_PUBLIC_ROOTS"]
certifi.where = lambda: roots

from egress_guard.cli.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
