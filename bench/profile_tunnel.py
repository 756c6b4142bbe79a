"""Profile a proxy's tunnel path under load: ``python -m bench.profile_tunnel``.

Starts the upstream and one configuration (default: egress-guard tunnel mode with policy,
audit and metrics), drives new-tunnel load at c=8, and samples the proxy with py-spy
(``pip install py-spy`` into the venv). Prints the hottest functions by self time and by
inclusive time, and time per area (mitmproxy core, the guard addon, sinks, asyncio, ssl).

``--cprofile`` instead runs the proxy under cProfile (slower, but exact call counts per
tunnel). Loopback only; bounded by --seconds; stops everything it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from bench.certs import make_certs
from bench.configs import CONFIGS, EXPERIMENTS, Env
from bench.run import start_upstream
from bench.upstream import BULK_BYTES

VENV_BIN = Path(sys.executable).parent
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")

AREAS = [
    ("egress_guard/audit", "guard: audit sink"),
    ("egress_guard/metrics", "guard: metrics sink"),
    ("prometheus_client", "guard: metrics sink"),
    ("egress_guard/engine", "guard: engine"),
    ("egress_guard/normalize", "guard: engine"),
    ("egress_guard/", "guard: addon/other"),
    ("mitmproxy/addonmanager", "mitmproxy: addon dispatch"),
    ("mitmproxy/addons/", "mitmproxy: addons"),
    ("mitmproxy/proxy/server", "mitmproxy: connection handler"),
    ("mitmproxy/proxy/layers/http", "mitmproxy: http layer (CONNECT)"),
    ("mitmproxy/proxy/", "mitmproxy: layers/events"),
    ("mitmproxy/", "mitmproxy: other"),
    ("asyncio/", "asyncio"),
    ("ssl.py", "ssl"),
    ("logging/", "logging"),
]


def area(file: str) -> str:
    for needle, name in AREAS:
        if needle in file:
            return name
    return "other: " + Path(file).name


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "python3.12/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{m.group('func')} ({f}:{m.group('line') or '?'})"


def analyse(raw: Path, top: int) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any("Thread._bootstrap" in f for f in frames):
            thread = "worker thread: " + next(
                (
                    short(f)
                    for f in frames
                    if ("_run" in f and "egress_guard" in f) or "serve_forever" in f
                ),
                "?",
            )
        else:
            thread = "main thread (event loop)"
        threads[thread] += count
        total += count
        leaf = frames[-1]
        self_t[short(leaf)] += count
        m = FRAME.match(leaf)
        # charge the sample to the innermost frame that is not stdlib glue
        owner = "?"
        for fr in reversed(frames):
            mm = FRAME.match(fr)
            if mm and (
                "egress_guard" in mm.group("file")
                or "mitmproxy" in mm.group("file")
                or "prometheus" in mm.group("file")
            ):
                owner = area(mm.group("file"))
                break
        else:
            owner = area(m.group("file")) if m else "?"
        areas[owner] += count
        for fr in set(frames):
            incl[short(fr)] += count
    out = [f"samples: {total}", "", "## samples by thread"]
    for k, v in threads.most_common():
        out.append(f"{v / total:6.1%}  {k}")
    out += ["", "## time by area (innermost egress_guard/mitmproxy frame)"]
    for k, v in areas.most_common():
        out.append(f"{v / total:6.1%}  {k}")
    out += ["", f"## top {top} by self time"]
    for k, v in self_t.most_common(top):
        out.append(f"{v / total:6.1%}  {k}")
    out += ["", f"## top {top} by inclusive time"]
    for k, v in incl.most_common(top):
        out.append(f"{v / total:6.1%}  {k}")
    return "\n".join(out)


async def drive(t: loadgen.Target, seconds: float, c: int) -> loadgen.Result:
    return await loadgen.load(t, c, seconds, 100_000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--config",
        default="guard_tunnel",
        choices=[c.key for c in CONFIGS + EXPERIMENTS if c.build is not None],
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "--gil",
        action="store_true",
        help="py-spy --gil: only samples of the thread holding the GIL",
    )
    ap.add_argument(
        "--cprofile",
        action="store_true",
        help="run the proxy under cProfile instead of sampling it with py-spy",
    )
    ap.add_argument("--out", help="directory to keep the raw profile in")
    ap.add_argument(
        "--bulk",
        type=int,
        default=0,
        help="profile N 10 MiB downloads (one tunnel each) instead of new-tunnel load",
    )
    a = ap.parse_args()
    cfg = next(c for c in CONFIGS + EXPERIMENTS if c.key == a.config)
    wd = Path(tempfile.mkdtemp(prefix="egress-guard-profile-"))
    wd.chmod(0o711)
    out_dir = Path(a.out) if a.out else wd
    out_dir.mkdir(parents=True, exist_ok=True)
    upstream = child = spy = None
    try:
        ca, leaf, key = make_certs(wd / "certs")
        upstream, _ = start_upstream(wd, leaf, key, False)
        env = Env(wd, upstream.port, ca)
        assert cfg.build is not None
        child = cfg.build(env)
        prof = out_dir / f"{a.config}.prof"
        if a.cprofile:
            # cProfile runs a console script by path, or a module with -m
            rest = child.argv[1:] if child.argv[1] == "-m" else child.argv
            child.argv = [sys.executable, "-m", "cProfile", "-o", str(prof), *rest]
        child.start()
        cas = [str(ca)] + ([str(cfg.extra_ca(env, child))] if cfg.extra_ca else [])
        t = loadgen.Target(
            upstream.port, loadgen.client_context(*cas), ("127.0.0.1", child.port), cfg.connect_host
        )
        asyncio.run(drive(t, 1.0, a.concurrency))  # warm-up
        cpu0 = child.cpu_seconds()
        raw = out_dir / f"{a.config}.pyspy.txt"
        if not a.cprofile:
            spy_bin = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
            if spy_bin is None:
                print("py-spy not installed (pip install py-spy), or use --cprofile")
                return 2
            spy = subprocess.Popen(
                [
                    spy_bin,
                    "record",
                    "--pid",
                    str(child.pid),
                    "--rate",
                    str(a.rate),
                    "--duration",
                    str(int(a.seconds)),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--threads",
                    *(["--gil"] if a.gil else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
        if a.bulk:
            rates = asyncio.run(loadgen.bulk(t, a.bulk))
            cpu = child.cpu_seconds() - cpu0
            mb = a.bulk * BULK_BYTES / 1e6
            print(
                f"{a.config}: {a.bulk} downloads, median {statistics.median(rates):.0f} MB/s, "
                f"proxy CPU {cpu * 1e3 / mb:.2f} ms per MB"
            )
            res = None
        else:
            res = asyncio.run(drive(t, a.seconds, a.concurrency))
            cpu = child.cpu_seconds() - cpu0
        if res is not None:
            print(
                f"{a.config}: {res.rate:.1f} tunnels/s at c={a.concurrency}, "
                f"{res.errors} errors, proxy CPU {cpu / max(1, res.ok) * 1e3:.2f} ms per tunnel"
                + (" (under cProfile)" if a.cprofile else "")
            )
        if spy is not None:
            _, err = spy.communicate(timeout=a.seconds + 30)
            if not raw.exists():
                print("py-spy failed:", err.decode(errors="replace")[-2000:])
                return 1
            print(analyse(raw, a.top))
        if a.cprofile:
            child.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
            child.proc.wait(30)  # type: ignore[union-attr]
            import pstats

            st = pstats.Stats(str(prof))
            print(f"\ntunnels measured (plus warm-up): {res.ok if res else a.bulk}")
            st.sort_stats("tottime").print_stats(a.top)
            st.sort_stats("cumulative").print_stats(a.top)
    finally:
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            spy.wait(10)
        if child is not None:
            child.stop()
        if upstream is not None:
            upstream.stop()
        if not a.out:
            shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
