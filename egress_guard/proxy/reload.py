"""Policy loading and reload, as its own mitmproxy addon (PolicyReload).

Declares the policy options in ``load``, loads the policy in ``configure`` (a bad one
at start-up is an OptionsError: the proxy does not start), and once running reloads it
on SIGHUP and when the file changes. A reload that fails keeps the policy in force. The
new engine is swapped into the shared GuardState in one assignment, so a request sees
the old policy or the new one, never half of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from egress_guard.engine import Engine
from egress_guard.normalize import socket_ip
from egress_guard.policy import EffectivePolicy, PolicyError, load_policy, load_preset
from egress_guard.policy.loader import read_regular_file
from egress_guard.proxy.state import GuardState
from egress_guard.sinks.events import PolicyEvent
from egress_guard.sinks.logsafe import Block

log = logging.getLogger("egress_guard")

RELOAD_POLL_S = 1.0
#: a changed policy file must keep the same size, mtime and inode this long to be loaded
RELOAD_SETTLE_S = 0.5


class PolicyReload:
    """mitmproxy addon: the policy in force (start-up, SIGHUP, file watch)."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_policy_reload"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard
        self._watch_task: asyncio.Task[None] | None = None
        self._policy_stamp: tuple[Any, ...] | None = None
        self._reload_lock = asyncio.Lock()
        self._sighup_task: asyncio.Task[bool] | None = None
        #: the policy given at start-up did not load: the proxy will not start, and the
        #: rollback mitmproxy then makes (options back to their defaults, configure called
        #: again) must not load, log and audit the built-in preset as "policy loaded"
        self._start_failed = False

    # -- mitmproxy lifecycle ------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "egress_guard_policy",
            str,
            "",
            "Policy file (YAML). Empty: the built-in minimal preset.",
        )
        loader.add_option(
            "egress_guard_mode",
            str,
            "",
            "Override the policy's mode: enforce or audit. Empty: the policy's own mode.",
            choices=("", "enforce", "audit"),
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"egress_guard_policy", "egress_guard_mode"}:
            if self._start_failed:
                return
            try:
                policy = self._read_policy()
            except PolicyError as e:
                self.g.emit_policy(
                    PolicyEvent(False, self._policy_source(), None, 1, None, e.render())
                )
                self._start_failed = self.g.engine is None
                raise exceptions.OptionsError(e.render()) from None
            self._install(policy)
        elif "egress_guard_inspect" in updated and self.g.engine is not None:
            self._warn_uninspected(self.g.engine.policy)

    def running(self) -> None:
        self.g.self_endpoints = self._listen_endpoints(self.g.other_listeners)
        if self.g.engine is not None:
            self.g.engine = replace_engine(self.g.engine, self.g.self_endpoints)
        self._start_reload_watch()

    def done(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    # -- policy ------------------------------------------------------------------------

    def _policy_source(self) -> str:
        return str(ctx.options.egress_guard_policy or "builtin:minimal")

    def _read_policy(self) -> EffectivePolicy:
        return _load(ctx.options.egress_guard_policy, ctx.options.egress_guard_mode)

    def _install(self, policy: EffectivePolicy) -> None:
        """Build and activate a policy (start-up path, on the event loop)."""
        engine = Engine(policy, self.g.catalog, self.g.self_endpoints)
        self._activate(policy, engine, read_users(policy), _stamp(ctx.options.egress_guard_policy))

    def _activate(
        self, policy: EffectivePolicy, engine: Engine, users: dict[str, str], stamp: Any
    ) -> None:
        """Swap in a fully built policy: one assignment, so a request sees old or new."""
        self.g.engine = engine
        self.g.users = users
        self._policy_stamp = stamp
        log.info(
            "egress-guard: policy %s loaded (mode %s, %d destinations, sha256 %s)",
            policy.source,
            policy.mode,
            len(policy.destinations),
            policy.sha256[:16],
        )
        self.g.emit_policy(
            PolicyEvent(
                True,
                policy.source,
                policy.sha256,
                1,
                policy.mode,
                destinations=tuple(d.name for d in policy.destinations),
            )
        )
        self._warn_uninspected(policy)

    @staticmethod
    def _warn_uninspected(policy: EffectivePolicy) -> None:
        """Say at start-up and on each reload which tunnels will be refused because
        their destination's request rules need interception and it is off."""
        if ctx.options.egress_guard_inspect:
            return
        names = [d.name for d in policy.destinations if d.needs_inspection]
        if not names:
            return
        log.warning(
            "egress-guard: inspection is off (no --inspect; mitmdump option "
            "egress_guard_inspect): HTTPS tunnels (CONNECT) to %s are %s as "
            "inspection_required, because their methods/paths/models rules can only be "
            "checked with TLS interception; plain-HTTP requests to them are checked as usual",
            ", ".join(repr(n) for n in names),
            "let through unchecked and recorded as would_block"
            if policy.mode == "audit"
            else "refused",
        )

    async def reload(self, *, only_if_changed: bool = False) -> bool:
        """Load the policy again; on any error keep the one in force. True on success.

        Parsing and compiling run in a worker thread: a policy of many thousand rules
        takes seconds to load, and the proxy keeps serving under the old one meanwhile.
        ``only_if_changed`` (the file watcher): nothing to do if the file is as last
        loaded, which it is when a SIGHUP sent after the edit got there first.
        """
        async with self._reload_lock:
            path, mode = ctx.options.egress_guard_policy, ctx.options.egress_guard_mode
            stamp = _stamp(path)
            if only_if_changed and stamp == self._policy_stamp:
                return True
            catalog, endpoints = self.g.catalog, self.g.self_endpoints

            def build() -> tuple[EffectivePolicy, Engine, dict[str, str]]:
                policy = _load(path, mode)
                return policy, Engine(policy, catalog, endpoints), read_users(policy)

            try:
                policy, engine, users = await asyncio.to_thread(build)
            except PolicyError as e:
                log.error(
                    Block("egress-guard: policy reload rejected, keeping the old policy:\n%s"),
                    Block(e.render()),
                )
                self._policy_stamp = stamp
                self.g.emit_policy(
                    PolicyEvent(False, self._policy_source(), None, 1, None, e.render())
                )
                return False
            except Exception as e:  # the old policy stays in force whatever went wrong
                log.exception("egress-guard: policy reload failed, keeping the old policy")
                self._policy_stamp = stamp
                self.g.emit_policy(
                    PolicyEvent(False, self._policy_source(), None, 1, None, repr(e))
                )
                return False
            self._activate(policy, engine, users, stamp)
            return True

    def _start_reload_watch(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if ctx.options.egress_guard_policy:
            self._watch_task = loop.create_task(self._watch_policy())

    def _on_sighup(self) -> None:
        log.info("egress-guard: SIGHUP, reloading policy")
        self._sighup_task = asyncio.get_running_loop().create_task(self.reload())

    async def _watch_policy(self) -> None:
        """Poll the policy file. Polling the resolved path catches in-place edits, renames
        over the file and a Kubernetes ConfigMap's ``..data`` symlink swap alike.

        A change is loaded only once the file has stopped changing for a moment: a file
        rewritten in place can be valid YAML halfway through (everything before
        ``deny:``), and loading that would drop rules both versions have.
        """
        while True:
            await asyncio.sleep(RELOAD_POLL_S)
            stamp = _stamp(ctx.options.egress_guard_policy)
            if stamp == self._policy_stamp:
                continue
            while True:
                await asyncio.sleep(RELOAD_SETTLE_S)
                settled = _stamp(ctx.options.egress_guard_policy)
                if settled == stamp:
                    break
                stamp = settled
            log.info("egress-guard: policy file changed, reloading")
            await self.reload(only_if_changed=True)

    @staticmethod
    def _listen_endpoints(
        others: Sequence[tuple[str, int]] = (),
    ) -> frozenset[tuple[str, int]]:
        ps = ctx.master.addons.get("proxyserver")
        addrs = [*(ps.listen_addrs() if ps is not None else ()), *others]
        out: set[tuple[str, int]] = set()
        for addr in addrs:
            host, port = str(addr[0]), int(addr[1])
            ip = socket_ip(host)
            if ip.is_unspecified:
                for local in _local_addresses():
                    out.add((local, port))
            else:
                out.add((str(ip), port))
                if ip.is_loopback:
                    out.update((a, port) for a in ("127.0.0.1", "::1"))
        return frozenset(out)


def replace_engine(engine: Engine, self_endpoints: frozenset[tuple[str, int]]) -> Engine:
    return Engine(engine.policy, engine.catalog, self_endpoints)


def _load(path: str, mode: str) -> EffectivePolicy:
    """The policy file (or the built-in minimal preset), with the --mode override applied."""
    policy = load_policy(path) if path else load_preset("minimal")
    return replace(policy, mode=mode) if mode else policy


def _stamp(path: str) -> tuple[Any, ...] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
    except OSError as e:
        return ("missing", e.errno)


def _local_addresses() -> set[str]:
    out = {"127.0.0.1", "::1", "0.0.0.0", "::"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(socket_ip(str(info[4][0]))))
    return out


def read_users(policy: EffectivePolicy) -> dict[str, str]:
    """``user:password`` or ``user:sha256:<hex>`` per line; # comments."""
    if policy.clients.auth is None:
        return {}
    path = Path(policy.clients.auth.users_file)
    if not path.is_absolute():
        path = Path(policy.source).parent / path
    users: dict[str, str] = {}
    # never blocks (a FIFO or device there is refused): it runs under the reload lock
    raw = read_regular_file(path, "users_file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(str(path), None, "users_file is not valid UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        if not sep or not user or not secret:
            raise PolicyError(str(path), n, "expected user:password or user:sha256:<hex>")
        users[user] = secret
    return users
