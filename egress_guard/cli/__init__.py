"""The ``egress-guard`` command line: one module per command, built on the layers below."""
