"""The configurations compared side by side, and how to start each one.

Every configuration talks to the same loopback upstream. Proxies other than egress-guard
get the upstream as an address in CONNECT (no DNS); egress-guard gets the test name, which
its policy maps to 127.0.0.1 with ``network.resolve`` (static, no DNS either) and allows
only that address (``network.allow_cidrs: [127.0.0.1/32]``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.certs import SNI
from bench.procs import Child, free_port

VENV_BIN = Path(sys.executable).parent
MITMDUMP = VENV_BIN / "mitmdump"
EGRESS_GUARD = VENV_BIN / "egress-guard"


@dataclass
class Env:
    workdir: Path
    upstream_port: int
    ca_pem: Path


@dataclass
class Config:
    key: str
    label: str
    #: how the row was run, for the README-style notes under the table
    note: str
    #: None for direct; otherwise builds the process (may raise Skip)
    build: Callable[[Env], Child] | None
    connect_host: str = "127.0.0.1"
    #: extra CA to trust (inspect mode: the guard's interception CA), from the running child
    extra_ca: Callable[[Env, Child], Path] | None = None
    #: part of the standard comparison (False: an experiment, run with --experiments)
    default: bool = True


class Skip(Exception):
    pass


def policy_text(port: int, inspect: bool) -> str:
    rules = '    methods: [GET]\n    paths: ["/*"]\n' if inspect else ""
    return f"""\
version: 1
mode: enforce
destinations:
  - name: bench
    purpose: benchmark upstream on loopback
    hosts: [{SNI}]
    ports: [{port}]
{rules}network:
  block_private: true
  allow_cidrs: [127.0.0.1/32]
  resolve:
    {SNI}: 127.0.0.1
"""


def _guard(
    env: Env,
    name: str,
    inspect: bool,
    *,
    audit: bool = True,
    metrics: bool = True,
    patches: str = "",
    optimize: bool = False,
    event_loop: str = "",
) -> Child:
    wd = env.workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    policy = wd / "policy.yaml"
    policy.write_text(policy_text(env.upstream_port, inspect))
    port, mport = free_port(), free_port()
    run_args = [
        "run",
        "--policy",
        str(policy),
        "--listen",
        f"127.0.0.1:{port}",
        "--confdir",
        str(wd / "conf"),
        "--audit-log",
        str(wd / "audit.log") if audit else "",
        "--audit-fsync",
        "interval",
    ]
    if metrics:
        run_args += ["--metrics", f"127.0.0.1:{mport}"]
    if inspect:
        run_args += ["--inspect", "--upstream-ca", str(env.ca_pem)]
    if event_loop:
        run_args += ["--event-loop", event_loop]
    env_vars = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if optimize:
        env_vars["PYTHONOPTIMIZE"] = "1"
    if patches or optimize:
        argv = [sys.executable, "-m", "bench.variants", patches, "--", *run_args]
    else:
        argv = [str(EGRESS_GUARD), *run_args]
    return Child(name, argv, wd, port, env=env_vars)


def _guard_ca(env: Env, child: Child) -> Path:
    out = child.workdir / "guard-ca.pem"
    subprocess.run(
        [
            str(EGRESS_GUARD),
            "ca",
            "export",
            "--confdir",
            str(child.workdir / "conf"),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def _mitmdump(env: Env, name: str, quiet: bool) -> Child:
    wd = env.workdir / name
    port = free_port()
    argv = [
        str(MITMDUMP),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--ignore-hosts",
        ".*",
        "--set",
        f"confdir={wd / 'conf'}",
    ]
    if quiet:
        argv.append("-q")
    return Child(name, argv, wd, port)


def _minimal(env: Env) -> Child:
    wd = env.workdir / "minimal"
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.minimal_master",
        "--port",
        str(port),
        "--confdir",
        str(wd / "conf"),
    ]
    return Child(
        "minimal", argv, wd, port, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    )


def _bare_relay(env: Env, splice: bool = False) -> Child:
    name = "bare_splice" if splice else "bare_relay"
    wd = env.workdir / name
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_relay", "--port", str(port)]
    argv += ["--splice"] if splice else []
    return Child(name, argv, wd, port, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


SQUID_CONF = """\
http_port 127.0.0.1:{port}
acl bench_client src 127.0.0.1/32
acl CONNECT method CONNECT
http_access allow bench_client
http_access deny all
cache deny all
cache_mem 8 MB
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
coredump_dir {dir}
netdb_filename none
pinger_enable off
logfile_rotate 0
shutdown_lifetime 0 seconds
max_filedescriptors 8192
"""


def _squid(env: Env) -> Child:
    binary = shutil.which("squid") or (
        "/usr/sbin/squid" if os.path.exists("/usr/sbin/squid") else None
    )
    if binary is None:
        raise Skip("squid not installed")
    wd = env.workdir / "squid"
    wd.mkdir(parents=True, exist_ok=True)
    wd.chmod(0o777)  # squid drops to its effective user (proxy) and writes logs here
    port = free_port()
    conf = wd / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, dir=wd))
    return Child("squid", [binary, "-N", "-f", str(conf)], wd, port)


TINYPROXY_CONF = """\
User nobody
Group nogroup
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 2048
Allow 127.0.0.1
LogFile "{dir}/tinyproxy.log"
LogLevel Info
PidFile "{dir}/tinyproxy.pid"
"""


def _tinyproxy(env: Env) -> Child:
    binary = shutil.which("tinyproxy") or (
        "/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None
    )
    if binary is None:
        raise Skip("tinyproxy not installed")
    wd = env.workdir / "tinyproxy"
    wd.mkdir(parents=True, exist_ok=True)
    wd.chmod(0o777)  # tinyproxy drops to nobody
    port = free_port()
    conf = wd / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF.format(port=port, dir=wd))
    return Child("tinyproxy", [binary, "-d", "-c", str(conf)], wd, port)


CONFIGS: list[Config] = [
    Config("direct", "direct (no proxy)", "client to upstream: TCP + TLS + GET", None),
    Config(
        "mitmdump",
        "bare mitmdump passthrough",
        "`mitmdump --ignore-hosts '.*'` (all default addons, flow printing to a log file)",
        lambda e: _mitmdump(e, "mitmdump", quiet=False),
    ),
    Config(
        "mitmdump_q",
        "mitmdump -q passthrough",
        "same with `-q` (no flow printing)",
        lambda e: _mitmdump(e, "mitmdump_q", quiet=True),
    ),
    Config(
        "minimal",
        "minimal mitmproxy master (no guard)",
        "core, proxyserver, next_layer, tlsconfig; `ignore_hosts .*`; lazy connect "
        "(bench/minimal_master.py)",
        _minimal,
    ),
    Config(
        "guard_tunnel",
        "egress-guard tunnel (policy+audit+metrics)",
        "`egress-guard run --policy P --audit-log FILE --audit-fsync interval --metrics ...`"
        " (on uvloop, the default event loop)",
        lambda e: _guard(e, "guard_tunnel", inspect=False),
        connect_host=SNI,
    ),
    Config(
        "guard_inspect",
        "egress-guard inspect (TLS interception)",
        "same plus `--inspect --upstream-ca`; destination has methods/paths rules",
        lambda e: _guard(e, "guard_inspect", inspect=True),
        connect_host=SNI,
        extra_ca=_guard_ca,
    ),
    Config("squid", "squid", "squid -N, memory-only, CONNECT allowed, access log on", _squid),
    Config(
        "bare_relay",
        "bare Python relay (reference, no policy)",
        "bench/bare_relay.py: CONNECT, then read/send between the two sockets from "
        "event-loop callbacks; no mitmproxy, no checks. The floor for a Python relay here",
        _bare_relay,
    ),
    Config("tinyproxy", "tinyproxy", "tinyproxy -d, LogLevel Info", _tinyproxy),
    Config(
        "bare_splice",
        "bare Python relay with splice(2) (reference, no policy)",
        "bench/bare_relay.py --splice: the same relay moving bytes socket → pipe → socket "
        "with splice(2), so they never enter Python",
        lambda e: _bare_relay(e, splice=True),
        default=False,
    ),
]


def _exp(key: str, label: str, note: str, **kw: object) -> Config:
    return Config(
        key,
        label,
        note,
        lambda e: _guard(e, key, False, **kw),  # type: ignore[arg-type]
        connect_host=SNI,
        default=False,
    )


#: Experiments (``python -m bench --experiments``): egress-guard tunnel mode with one
#: thing removed or one candidate change patched in (bench/variants.py), to measure what
#: each costs or would gain before egress_guard/ is edited.
EXPERIMENTS: list[Config] = [
    _exp(
        "x_copying_relay",
        "guard tunnel, relay reading into new bytes",
        "the spliced relay as a plain protocol: a new bytes object per read",
        patches="copying_relay",
    ),
    _exp("x_no_audit", "guard tunnel, no audit log", "`--audit-log ''`", audit=False),
    _exp("x_no_metrics", "guard tunnel, no metrics", "no `--metrics`", metrics=False),
    _exp(
        "x_no_sinks", "guard tunnel, no audit, no metrics", "both off", audit=False, metrics=False
    ),
    _exp(
        "x_asyncio_loop",
        "guard tunnel on asyncio's own loop",
        "`--event-loop asyncio` (the default is uvloop)",
        event_loop="asyncio",
    ),
    _exp(
        "x_optimize",
        "guard tunnel under -O",
        "PYTHONOPTIMIZE=1: no asserts, no mitmproxy __debug__ checks",
        optimize=True,
    ),
]
