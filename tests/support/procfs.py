"""What a process under test holds, read from /proc (Linux): descriptors, memory and the
TCP connections behind its sockets."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM a process a test started (a guard, an upstream), SIGKILL if it does not
    exit within ``timeout``; nothing if it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def tcp_ports(pid: int) -> set[tuple[int, int]]:
    """(local port, remote port) of every TCP socket the process holds a descriptor for.

    A descriptor count compared with a baseline is racy (the readiness probe's socket
    may still be open when the baseline is taken); asking which connections a process
    still holds names the leaked one exactly.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().name
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    held = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            if cols[9] in inodes:
                held.add((int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)))
    return held


def proc_stats(pid: int) -> dict[str, int]:
    """Open file descriptors and resident memory (kB) of a process."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"fds": fds, "rss_kb": rss}


def pid_of(p: object) -> int:
    """The pid of a started ``ProxyProcess`` (asserts it was started)."""
    proc = getattr(p, "proc", None)
    assert proc is not None
    return int(proc.pid)
