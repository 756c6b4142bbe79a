"""Experiment launcher: ``egress-guard`` with candidate hot-path changes patched in.

Used only by the bench (``python -m bench --experiments``) to measure proposed changes
before anyone edits egress_guard/: ``python -m bench.variants PATCH[,PATCH...] -- run ...``
applies the named patches and then runs the normal CLI with the remaining arguments.
Nothing here is imported by egress_guard or the tests.

Patches
    hook_cache    AddonManager.handle_lifecycle resolves "which addons implement this hook"
                  once per hook name instead of walking every addon on every event, and
                  skips the ``update`` hook no addon of the embedded master implements
    gc_freeze     gc.freeze() once running and a larger generation-0 threshold
    sni_fast      the tunnel fast path reads the SNI with a small strict parser instead of
                  mitmproxy's kaitaistruct ClientHello parser; anything but the plain case
                  (one record, one SNI extension with one host_name) falls back to it
    no_msg_typecheck  drop only mitmproxy's per-message ``if __debug__`` type check
                  (``mitmproxy.http.MessageData.__post_init__``), keeping every assert
    metrics_cache the metrics sink keeps its prometheus label children in a dict instead
                  of calling ``labels()`` (lock + tuple + dict) four times per tunnel
(``-O`` / PYTHONOPTIMIZE is not a patch: the bench sets it in the environment; it drops
mitmproxy's ``if __debug__:`` type checks of every HTTP message it builds.)
"""

from __future__ import annotations

import gc
import inspect
import sys


def patch_hook_cache() -> None:
    from mitmproxy import addonmanager, exceptions, flow, hooks

    orig_add = addonmanager.AddonManager.add
    orig_remove = addonmanager.AddonManager.remove

    def _table(self: addonmanager.AddonManager, name: str) -> list:
        cache = self.__dict__.setdefault("_eg_hooks", {})
        funcs = cache.get(name)
        if funcs is None:
            funcs = []
            for a in addonmanager.traverse(self.chain):
                f = getattr(a, name, None)
                if f is not None and callable(f):
                    funcs.append(f)
            cache[name] = funcs
        return funcs

    async def handle_lifecycle(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
        args = event.args()
        for f in _table(self, event.name):
            try:
                with addonmanager.safecall():
                    res = f(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
        if isinstance(args[0], flow.Flow) and _table(self, "update"):
            await self.trigger_event(hooks.UpdateHook([args[0]]))

    def add(self, *addons):  # type: ignore[no-untyped-def]
        self.__dict__.pop("_eg_hooks", None)
        return orig_add(self, *addons)

    def remove(self, addon):  # type: ignore[no-untyped-def]
        self.__dict__.pop("_eg_hooks", None)
        return orig_remove(self, addon)

    addonmanager.AddonManager.handle_lifecycle = handle_lifecycle  # type: ignore[method-assign]
    addonmanager.AddonManager.add = add  # type: ignore[method-assign]
    addonmanager.AddonManager.remove = remove  # type: ignore[method-assign]


def patch_gc_freeze() -> None:
    from egress_guard.addon import EgressGuard

    orig = EgressGuard.running

    def running(self: EgressGuard) -> None:
        orig(self)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)

    EgressGuard.running = running  # type: ignore[method-assign]


class _Hello:
    __slots__ = ("sni",)

    def __init__(self, sni: str | None) -> None:
        self.sni = sni


def fast_sni(data: bytes) -> tuple[bool, str | None]:
    """(True, sni) for a complete, single-record ClientHello with exactly one SNI
    extension holding exactly one valid host_name (or no SNI extension at all);
    (False, None) for anything else, which the caller hands to mitmproxy's parser."""
    from mitmproxy.net import check

    n = len(data)
    if n < 9 or data[0] != 0x16 or data[1] != 0x03 or data[2] > 0x03 or data[5] != 0x01:
        return False, None
    rec_len = (data[3] << 8) | data[4]
    hs_len = (data[6] << 16) | (data[7] << 8) | data[8]
    if hs_len + 4 != rec_len or n < 5 + rec_len:
        return False, None  # several records, or not all here yet: the slow path decides
    end = 9 + hs_len
    i = 9 + 2 + 32  # legacy_version, random
    if i + 1 > end:
        return False, None
    i += 1 + data[i]  # session id
    if i + 2 > end:
        return False, None
    cs = (data[i] << 8) | data[i + 1]
    if cs % 2:
        return False, None
    i += 2 + cs
    if i + 1 > end:
        return False, None
    i += 1 + data[i]  # compression methods
    if i == end:
        return True, None  # no extensions
    if i + 2 > end:
        return False, None
    ext_end = i + 2 + ((data[i] << 8) | data[i + 1])
    if ext_end != end:
        return False, None
    i += 2
    sni_ext: tuple[int, int] | None = None
    while i < ext_end:
        if i + 4 > ext_end:
            return False, None
        etype = (data[i] << 8) | data[i + 1]
        elen = (data[i + 2] << 8) | data[i + 3]
        i += 4
        if i + elen > ext_end:
            return False, None
        if etype == 0:
            if sni_ext is not None:
                return False, None  # two SNI extensions: not the plain case
            sni_ext = (i, i + elen)
        elif etype == 16:
            # mitmproxy's parser reads ALPN bodies and rejects a truncated one: so must we
            if elen < 2:
                return False, None
            j, b = i + 2, i + elen
            while j < b:
                j += 1 + data[j]
            if j != b:
                return False, None
        i += elen
    if sni_ext is None:
        return True, None
    a, b = sni_ext
    if b - a < 5 or ((data[a] << 8) | data[a + 1]) != b - a - 2 or data[a + 2] != 0:
        return False, None
    hlen = (data[a + 3] << 8) | data[a + 4]
    if a + 5 + hlen != b:
        return False, None  # more than one server name: not the plain case
    host = bytes(data[a + 5 : b])
    if not check.is_valid_host(host):
        return False, None
    return True, host.decode("ascii")


def patch_sni_fast() -> None:
    from egress_guard import addon

    slow = addon.parse_client_hello

    def parse_client_hello(data: bytes):  # type: ignore[no-untyped-def]
        ok, sni = fast_sni(data)
        if ok:
            return _Hello(sni)
        return slow(data)

    addon.parse_client_hello = parse_client_hello  # type: ignore[assignment]


def patch_metrics_cache() -> None:
    from egress_guard import metrics as m

    def _child(self, family, **labels):  # type: ignore[no-untyped-def]
        cache = self.__dict__.setdefault("_eg_children", {})
        key = (id(family), *labels.values())
        c = cache.get(key)
        if c is None:
            c = cache[key] = family.labels(**labels)
        return c

    def decision(self, event):  # type: ignore[no-untyped-def]
        action = event.decision.action
        if action not in m._ACTIONS:
            return
        dest = self.label(event.decision.destination)
        _child(self, self._decisions, destination=dest, decision=action).inc()
        if event.opens:
            self.connection_opened(event.decision.destination)

    def close(self, event):  # type: ignore[no-untyped-def]
        dest = self.label(event.destination)
        _child(self, self._bytes, destination=dest, direction="up").inc(
            m._non_negative(event.bytes_up)
        )
        _child(self, self._bytes, destination=dest, direction="down").inc(
            m._non_negative(event.bytes_down)
        )
        _child(self, self._duration, destination=dest).observe(m._non_negative(event.duration_s))
        self.connection_closed(event.destination)

    m.Metrics.decision = decision  # type: ignore[method-assign]
    m.Metrics.close = close  # type: ignore[method-assign]


def patch_no_msg_typecheck() -> None:
    from mitmproxy import http

    if "__post_init__" in http.MessageData.__dict__:
        http.MessageData.__post_init__ = lambda self: None  # type: ignore[method-assign]


PATCHES = {
    "no_msg_typecheck": patch_no_msg_typecheck,
    "sni_fast": patch_sni_fast,
    "metrics_cache": patch_metrics_cache,
    "hook_cache": patch_hook_cache,
    "gc_freeze": patch_gc_freeze,
}


def main() -> int:
    argv = sys.argv[1:]
    names = [n for n in argv[0].split(",") if n] if argv and argv[0] != "--" else []
    rest = argv[argv.index("--") + 1 :] if "--" in argv else argv[1:]
    for n in names:
        PATCHES[n]()
    from egress_guard.cli import main as cli_main

    sys.argv = ["egress-guard", *rest]
    return int(cli_main() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
