"""Policy texts for proxy tests: test hosts resolve statically to loopback."""

from __future__ import annotations


def make_policy(
    *ports: int, extra: str = "", mode: str = "enforce", allow: str = "127.0.0.1/32"
) -> str:
    """A policy naming api.test on the given ports; other.test/private.test are unlisted."""
    port_list = ", ".join(str(p) for p in ports)
    return f"""\
version: 1
mode: {mode}
destinations:
  - name: test-api
    purpose: test upstream
    hosts: [api.test]
    ports: [{port_list}]
  - name: private-api
    purpose: allowed by name, but resolves to a private address
    hosts: [private.test, localhost]
    ports: [{port_list}]
deny:
  - hosts: ["**.denied.test"]
network:
  allow_cidrs: [{allow}]
  resolve:
    api.test: 127.0.0.1
    other.test: 127.0.0.1
    private.test: 127.0.0.2
    x.denied.test: 127.0.0.1
{extra}"""


#: request rules that make api.test an inspected destination with a model allowlist
MODEL_RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*", "/v1beta/*"]
    models: [good-model, gemini-ok]
"""


def with_rules(port: int, rules: str, mode: str = "enforce") -> str:
    """``make_policy`` with request rules on test-api (rules make a destination inspected)."""
    return make_policy(port, mode=mode).replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{rules}  - name: private-api",
        1,
    )


def inspect_policy(port: int, mode: str = "enforce") -> str:
    """api.test inspected, with method, path and model rules."""
    return with_rules(port, MODEL_RULES, mode)
