"""``egress-guard doctor``: what in OpenCode's config or environment defeats the guard.

Each finding has a severity, a message naming the setting (``file:line`` or the
environment variable) and the exact fix. Errors are what makes the setup leak or fail:
traffic that bypasses the proxy (proxy variables unset or pointing elsewhere, a NO_PROXY
wider than the local network, TLS checks turned off), traffic that cannot pass it (mDNS),
a config whose needs the policy blocks (the provider, auto-update), and an OpenCode server
that any web page may drive (CORS ``*``). Warnings are risky but working setups; info is
context. Exit 1 when there is an error, else 0.

Nothing here touches the network: the policy is checked by name with the engine
(``rules.names.decide_target``), exactly as the proxy's first stage would.

Here: the checks of the config, which ask the engine. ``doctor_env`` checks the
environment, ``doctor_values`` judges single values and finds the config files, and
``doctor_report`` holds the input, the findings and their printing.
"""

from __future__ import annotations

from egress_guard.engine import Engine, Match
from egress_guard.engine.rules.names import decide_target
from egress_guard.normalize import join_hostport
from egress_guard.opencode import contacts as oc
from egress_guard.opencode import doctor_env, jsonc
from egress_guard.opencode.config import OpenCodeConfig
from egress_guard.opencode.doctor_report import SEVERITY_ORDER, DoctorInput, Finding, Severity
from egress_guard.opencode.doctor_values import cors_problem, truthy
from egress_guard.policy import CatalogEntry
from egress_guard.policy.writer import destination_name

# -- the checks ---------------------------------------------------------------------------


class _Doctor:
    def __init__(self, inp: DoctorInput) -> None:
        self.inp = inp
        self.cfg = inp.cfg if inp.cfg is not None else OpenCodeConfig({}, {}, ())
        self.env = inp.env
        self.engine = Engine(inp.policy, inp.catalog)
        self.out: list[Finding] = []

    def add(
        self, severity: Severity, check: str, message: str, fix: str, source: str | None = None
    ) -> None:
        self.out.append(Finding(severity, check, message, fix, source))

    def allowed(self, host: str, port: int) -> bool:
        return isinstance(decide_target(self.engine.compiled, host, port), Match)

    def where(self, *path: str) -> str | None:
        if self.inp.cfg is None or self.cfg.line_of(path) is None:
            return None
        return self.cfg.where(path)

    def entry(self, name: str | None) -> CatalogEntry | None:
        e = self.inp.catalog.get(name) if name else None
        return e if e is not None and e.usable is None else None

    # -- config ------------------------------------------------------------------------

    def config_files(self) -> None:
        if self.inp.discovered is None:
            if self.env.get("OPENCODE_CONFIG_CONTENT"):
                self.add(
                    "info",
                    "config",
                    "OPENCODE_CONFIG_CONTENT is set: OpenCode merges it over the file given, "
                    "and it was not checked here",
                    "run `egress-guard doctor` without a file to check the merged configuration",
                    "env:OPENCODE_CONFIG_CONTENT",
                )
            return
        if self.inp.discovered:
            self.add(
                "info",
                "config",
                "checked the merged configuration of: " + ", ".join(self.inp.discovered),
                "name a file to check just that one",
            )
        else:
            self.add(
                "info",
                "config",
                "no OpenCode config found (looked at "
                + ", ".join(self.inp.checked_places[:6])
                + (" ..." if len(self.inp.checked_places) > 6 else "")
                + "): OpenCode's defaults are checked",
                "pass the opencode.json to check as an argument",
            )

    def autoupdate(self) -> None:
        state = oc.autoupdate(self.cfg)
        if state == "off" or truthy(self.env.get("OPENCODE_DISABLE_AUTOUPDATE")):
            return
        entry = self.inp.catalog.get("opencode-update")
        if entry is None:
            return
        blocked = [h for h in entry.hosts if not self.allowed(h, entry.ports[0])]
        if not blocked:
            return
        value = self.cfg.get("autoupdate")
        desc = {
            "on": '"autoupdate": true'
            if value is not None
            else "autoupdate is not set (default true)",
            "notify": '"autoupdate": "notify" (it still checks for new versions)',
            "unknown": f"autoupdate is {value} (assumed on)",
        }[state]
        self.add(
            "error",
            "autoupdate",
            f"{desc}: OpenCode contacts {', '.join(blocked)}, which {self.inp.policy_label} "
            "blocks; every start-up produces blocked requests and updates cannot install",
            'set "autoupdate": false in opencode.json (or export OPENCODE_DISABLE_AUTOUPDATE=1), '
            f"or add `- use: opencode-update` to {self.inp.own_policy}",
            self.where("autoupdate"),
        )

    def mdns(self) -> None:
        value = self.cfg.get("server", "mdns")
        if value is True:
            self.add(
                "error",
                "mdns",
                "server.mdns is true: mDNS is UDP multicast to 224.0.0.251/ff02::fb port 5353, "
                "which never passes an HTTP proxy (it goes around the guard, or fails)",
                'set "server": {"mdns": false} in opencode.json',
                self.where("server", "mdns"),
            )
        elif isinstance(value, jsonc.Placeholder):
            self.add(
                "warning",
                "mdns",
                f"server.mdns is {value}: known only when OpenCode runs",
                'set "server": {"mdns": false} in opencode.json',
                self.where("server", "mdns"),
            )

    def cors(self) -> None:
        origins = self.cfg.get("server", "cors")
        if not isinstance(origins, list):
            return
        for i, origin in enumerate(origins):
            if not isinstance(origin, str):
                continue
            problem = cors_problem(origin)
            if problem is not None:
                self.add(
                    "error",
                    "cors",
                    f"server.cors entry {origin!r}: {problem}",
                    "list exact origins only, e.g. "
                    '"server": {"cors": ["https://opencode.internal.example.com"]}',
                    self.cfg.where(("server", "cors", i)) if self.inp.cfg is not None else None,
                )

    def share(self) -> None:
        mode = oc.share(self.cfg)
        if mode == "disabled":
            return
        ent = oc.url_setting(self.cfg, ("enterprise", "url"))
        if ent is not None and ent.endpoint is not None:
            host, port = ent.endpoint.host, ent.endpoint.port
        elif ent is not None:
            host, port = f"the host of enterprise.url ({ent.raw})", 0
        else:
            host, port = "opncd.ai", 443
        if port and self.allowed(host, port):
            effect = f"sessions (code, prompts, outputs) can be uploaded to {host}"
        elif port:
            effect = f"the policy blocks {host}, so sharing fails (and each attempt is logged)"
        else:
            effect = f"sessions can be uploaded to {host}"
        desc = (
            'share is not set (default "manual")'
            if self.cfg.get("share") is None and self.cfg.get("autoshare") is None
            else f"share is {mode}"
        )
        self.add(
            "warning",
            "share",
            f"{desc}: {effect}",
            'set "share": "disabled" in opencode.json',
            self.where("share") or self.where("autoshare"),
        )

    def providers(self) -> None:
        if self.inp.cfg is None:
            return
        found = oc.providers(self.cfg)
        for note in found.notes:
            self.add(
                "warning", "provider", note, "name models as provider/model; see opencode.json"
            )
        if not found.used:
            self.add(
                "warning",
                "provider",
                "no provider is named in the config (model, small_model, agents, provider): "
                "OpenCode picks one from your credentials, and it cannot be checked here",
                'set "model": "provider/model" in opencode.json',
            )
        for p in found.used:
            self.provider(p)

    def provider(self, p: oc.ProviderUse) -> None:
        source = p.refs[0].rsplit(" (", 1)[-1].rstrip(")") if p.refs else None
        name = p.catalog or p.id
        target: tuple[str, int] | None = None
        if p.url is not None:
            source = p.url.where
            if p.url_ignored:
                self.add(
                    "warning",
                    "provider",
                    f"provider.{p.id}.baseURL is ignored by OpenCode 1.18, which reads "
                    f"provider.{p.id}.options.baseURL: OpenCode does not use {p.url.raw!r}",
                    f'move it: "provider": {{"{p.id}": {{"options": {{"baseURL": "{p.url.raw}"}}}}}}',
                    source,
                )
            ep = p.url.endpoint
            if ep is not None:
                target = (ep.host, ep.port)
                if ep.scheme == "http" and not ep.loopback:
                    self.add(
                        "info" if ep.site_internal else "warning",
                        "provider",
                        f"provider {p.id} uses plain http:// to {ep.host}: prompts and API keys "
                        "cross the network in clear",
                        f"use https:// in {p.url.key}",
                        source,
                    )
            elif p.url.unresolved:
                self.add(
                    "warning",
                    "provider",
                    f"provider {p.id}: {p.url.key} is {p.url.raw!r}, known only when OpenCode "
                    "runs; its host cannot be checked against the policy",
                    "check the expanded host with `egress-guard check --policy FILE HOST:PORT`",
                    source,
                )
                return
            else:
                self.add(
                    "error",
                    "provider",
                    f"provider {p.id}: {p.url.key} {p.url.raw!r} is unusable: {p.url.problem}",
                    f"write {p.url.key} as an absolute https:// URL",
                    source,
                )
                return
        else:
            entry = self.entry(p.catalog)
            if entry is None:
                self.add(
                    "warning",
                    "provider",
                    f"provider {p.id} is not in the catalog and sets no options.baseURL: "
                    "its API host cannot be checked",
                    f"make sure the policy has a destination for {p.id}'s API host",
                    source,
                )
                return
            target = (entry.hosts[0], entry.ports[0])
        host, port = target
        decision = decide_target(self.engine.compiled, host, port)
        if isinstance(decision, Match):
            return
        entry = self.entry(p.catalog)
        if entry is not None and host in entry.hosts and port in entry.ports:
            fix = f"add `- use: {entry.name}` to {self.inp.own_policy}"
        else:
            fix = (
                f"add a destination to {self.inp.own_policy}: {{name: {destination_name(name, 'provider')}, hosts: [{host}], "
                f"ports: [{port}]}} (`egress-guard policy from-opencode` writes it)"
            )
        self.add(
            "error",
            "provider",
            f"provider {p.id} ({', '.join(p.refs)}) calls {join_hostport(host, port)}, which "
            f"{self.inp.policy_label} does not allow ({decision.reason})",
            fix,
            source,
        )

    def mcp(self) -> None:
        for server in oc.mcp_servers(self.cfg):
            if server.kind != "remote" or server.url is None or server.url.endpoint is None:
                continue
            ep = server.url.endpoint
            if not self.allowed(ep.host, ep.port):
                self.add(
                    "warning",
                    "mcp",
                    f"remote MCP server {server.name} at {join_hostport(ep.host, ep.port)} is not "
                    f"allowed by {self.inp.policy_label}: its tools will fail",
                    f"add a destination for {ep.host} port {ep.port}, or set "
                    f'"mcp": {{"{server.name}": {{"enabled": false}}}}',
                    server.url.where,
                )

    def plugins(self) -> None:
        npm = [(p, s) for p, s in oc.plugin_specs(self.cfg) if oc.is_npm_spec(s)]
        entry = self.inp.catalog.get("npm-registry")
        if not npm or entry is None:
            return
        if all(self.allowed(h, entry.ports[0]) for h in entry.hosts):
            return
        self.add(
            "warning",
            "plugins",
            f"plugins {', '.join(s for _, s in npm)} install from registry.npmjs.org, which "
            f"{self.inp.policy_label} blocks: they load only if already installed",
            "pre-install the plugins into OpenCode's config directory, or add "
            f"`- use: npm-registry` to {self.inp.own_policy}",
            self.cfg.where(npm[0][0]) if self.inp.cfg is not None else None,
        )

    def webfetch(self) -> None:
        state = oc.webfetch(self.cfg)
        if state.enabled:
            self.add(
                "info",
                "webfetch",
                f"the webfetch tool is on ({state.why}): the agent can read any host the policy "
                "allows; other hosts are blocked and logged",
                'if the agent needs no web pages, set "permission": {"webfetch": "deny"}',
            )

    def models_fetch(self) -> None:
        if truthy(self.env.get("OPENCODE_DISABLE_MODELS_FETCH")):
            return
        if self.allowed("models.opencode.ai", 443):
            return
        self.add(
            "info",
            "models-fetch",
            "OpenCode fetches models.opencode.ai at start-up, which the policy blocks: each start "
            "logs a blocked request (OpenCode falls back to its bundled model list)",
            "export OPENCODE_DISABLE_MODELS_FETCH=1, or add `- use: models-catalog` to "
            f"{self.inp.own_policy}",
            "env:OPENCODE_DISABLE_MODELS_FETCH",
        )

    def run(self) -> list[Finding]:
        self.config_files()
        self.out.extend(doctor_env.proxy_env(self.inp))
        self.out.extend(doctor_env.no_proxy(self.inp))
        self.out.extend(doctor_env.tls(self.inp))
        self.autoupdate()
        self.mdns()
        self.cors()
        self.providers()
        self.share()
        self.mcp()
        self.plugins()
        self.webfetch()
        self.models_fetch()
        return sorted(self.out, key=lambda f: SEVERITY_ORDER[f.severity])


def diagnose(inp: DoctorInput) -> list[Finding]:
    """Every finding, errors first."""
    return _Doctor(inp).run()
