"""egress-guard benchmarks (not part of the test suite). Run: ``.venv/bin/python -m bench``."""
