"""``egress-guard doctor``'s checks of the environment OpenCode starts in: the proxy
variables, NO_PROXY, and TLS trust. They need no policy and no config file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path as FsPath

from egress_guard.opencode.doctor_report import DoctorInput, Finding
from egress_guard.opencode.doctor_values import (
    ProxyTarget,
    classify_no_proxy,
    parse_proxy_url,
    redact,
    split_no_proxy,
)


def proxy_env(inp: DoctorInput) -> Iterator[Finding]:
    guard = parse_proxy_url(inp.proxy_url)
    assert guard is not None  # checked by the CLI
    for var, kind in (("HTTPS_PROXY", "HTTPS"), ("HTTP_PROXY", "plain-HTTP")):
        present = [(n, inp.env[n]) for n in (var, var.lower()) if inp.env.get(n, "").strip()]
        if not present:
            yield Finding(
                "error",
                "proxy-env",
                f"{var} is not set: OpenCode's {kind} requests go straight out, "
                "unchecked and unlogged",
                f"export {var}={inp.proxy_url} in the environment that starts OpenCode",
                f"env:{var}",
            )
            continue
        for name, value in present:
            yield from proxy_value(inp, name, value, guard)


def proxy_value(inp: DoctorInput, name: str, value: str, guard: ProxyTarget) -> Iterator[Finding]:
    shown = redact(value)
    target = parse_proxy_url(value)
    fix = f"export {name}={inp.proxy_url}"
    if target is None:
        yield Finding(
            "error", "proxy-env", f"{name}={shown!r} is not a proxy URL", fix, f"env:{name}"
        )
    elif target.scheme != "http":
        yield Finding(
            "error",
            "proxy-env",
            f"{name}={shown!r}: egress-guard is a plain http:// proxy "
            f"(TLS goes inside CONNECT); a {target.scheme}:// proxy URL does not reach it",
            fix,
            f"env:{name}",
        )
    elif (target.host, target.port) == (guard.host, guard.port):
        return
    elif target.loopback and guard.loopback and target.port == guard.port:
        yield Finding(
            "warning",
            "proxy-env",
            f"{name}={shown!r} names the guard's port on another loopback spelling than "
            f"{inp.proxy_url} (localhost may resolve to ::1 where the guard does not listen)",
            fix,
            f"env:{name}",
        )
    else:
        yield Finding(
            "error",
            "proxy-env",
            f"{name}={shown!r} does not point at the guard ({inp.proxy_url}): "
            "OpenCode's traffic goes around it",
            fix + " (or pass the guard's address with --proxy-url)",
            f"env:{name}",
        )


def no_proxy(inp: DoctorInput) -> Iterator[Finding]:
    for var in ("NO_PROXY", "no_proxy"):
        value = inp.env.get(var)
        if not value:
            continue
        for entry in split_no_proxy(value):
            verdict = classify_no_proxy(entry)
            if verdict is None:
                continue
            severity, why = verdict
            yield Finding(
                severity,
                "no-proxy",
                f"{var} entry {entry.strip()!r} {why}",
                f"remove {entry.strip()!r} from {var}; keep only local names "
                "(localhost,127.0.0.1,::1,.local) and allow real destinations in the policy",
                f"env:{var}",
            )


def tls(inp: DoctorInput) -> Iterator[Finding]:
    if (inp.env.get("NODE_TLS_REJECT_UNAUTHORIZED") or "").strip() == "0":
        yield Finding(
            "error",
            "tls",
            "NODE_TLS_REJECT_UNAUTHORIZED=0 turns off certificate checks: any interceptor "
            "on the path can read and change OpenCode's traffic",
            "unset NODE_TLS_REJECT_UNAUTHORIZED; for inspect mode trust the guard's CA with "
            "NODE_EXTRA_CA_CERTS",
            "env:NODE_TLS_REJECT_UNAUTHORIZED",
        )
    if not inp.inspect:
        return
    fix = (
        "egress-guard ca export -o guard-ca.pem, then export "
        "NODE_EXTRA_CA_CERTS=$PWD/guard-ca.pem for OpenCode"
    )
    path = (inp.env.get("NODE_EXTRA_CA_CERTS") or "").strip()
    if not path:
        yield Finding(
            "error",
            "ca",
            "inspect mode intercepts TLS, but NODE_EXTRA_CA_CERTS is not set: OpenCode "
            "will refuse the guard's certificates",
            fix,
            "env:NODE_EXTRA_CA_CERTS",
        )
        return
    try:
        pem = FsPath(path).read_text(encoding="ascii", errors="replace")
    except OSError as e:
        yield Finding(
            "error",
            "ca",
            f"NODE_EXTRA_CA_CERTS={path!r} cannot be read ({e.strerror or e})",
            fix,
            "env:NODE_EXTRA_CA_CERTS",
        )
        return
    if "-----BEGIN CERTIFICATE-----" not in pem:
        yield Finding(
            "error",
            "ca",
            f"NODE_EXTRA_CA_CERTS={path!r} holds no PEM certificate",
            fix,
            "env:NODE_EXTRA_CA_CERTS",
        )
