"""``egress-guard policy from-opencode``: the policy an opencode.json needs, and no more.

What goes in, in this order (deterministic for a given file):

1. ``opencode-auth``, always (OpenCode's documented minimal allowlist).
2. Each provider in use (``model``, ``small_model``, agent/mode models, ``provider``
   entries; minus ``disabled_providers``, and only ``enabled_providers`` when set), sorted
   by id. A provider with its own ``options.baseURL`` (or ``api``) gets a destination for
   that host and port, named after the provider id; a built-in id without one takes its
   catalog entry. A local server (loopback baseURL) is allowed explicitly, so the policy
   works offline.
3. OpenCode's optional services, where the configuration turns them on: auto-update
   (on unless ``"autoupdate": false``), sharing (unless ``"share": "disabled"``; to
   ``enterprise.url`` instead of opncd.ai when that is set), npm for plugins.
4. Remote config hosts given with ``--remote-config`` (the URL of ``opencode auth login
   <url>``: OpenCode keeps it in auth.json, not in opencode.json).
5. Remote MCP servers, remote ``instructions`` and ``skills.urls``.
6. The webfetch tool, when it is on: it has no fixed hosts, so a commented template.

What cannot be known from the file (a ``{env:VAR}`` host, a provider the catalog does not
know) becomes a commented template and a warning on stderr; it is never guessed. Values
from the file appear in comments only after escaping every line break, so a crafted
opencode.json cannot write policy lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from egress_guard.opencode import contacts as oc
from egress_guard.opencode.config import OpenCodeConfig
from egress_guard.opencode.contacts import Endpoint, UrlSetting
from egress_guard.opencode.policygen_draft import Draft
from egress_guard.policy import CatalogEntry, load_preset
from egress_guard.policy.model import DenyRule
from egress_guard.policy.writer import destination_name

LOOPBACK_NAME_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class Generated:
    text: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Builder(Draft):
    """Reads the config section by section and adds what each needs to the draft."""

    def __init__(
        self,
        cfg: OpenCodeConfig,
        catalog: Mapping[str, CatalogEntry],
        deny: Sequence[DenyRule] = (),
    ) -> None:
        super().__init__(deny)
        self.cfg = cfg
        self.catalog = catalog
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def usable(self, name: str | None) -> CatalogEntry | None:
        entry = self.catalog.get(name) if name else None
        return entry if entry is not None and entry.usable is None else None

    # -- endpoints --------------------------------------------------------------------

    def endpoint_dest(
        self, want: str, purpose: str, ep: Endpoint, head: list[str], what: str
    ) -> None:
        comments = list(head)
        if ep.path not in ("", "/"):
            comments.append(
                f'  path prefix {ep.path} (to restrict it, add paths: ["{ep.path.rstrip("/")}/*"]; '
                "paths need `run --inspect`: without it, HTTPS tunnels to this destination are refused)"
            )
        if ep.loopback:
            hosts: tuple[str, ...] = LOOPBACK_NAME_HOSTS if ep.host == "localhost" else (ep.host,)
            comments.append(
                "  local server: loopback allowed explicitly (IP entries also lift "
                "network.block_private for these addresses); works offline"
            )
        else:
            hosts = (ep.host,)
            if ep.site_internal and ep.is_ip:
                comments.append(
                    f"  {ep.host} is not a public address: listing it here allows it despite "
                    "network.block_private"
                )
            if ep.site_internal and not ep.is_ip:
                comments.append(
                    f"  {ep.host} is a site-internal name: if it resolves to a private address, "
                    "add that address (or its CIDR) to hosts, or to network.allow_cidrs"
                )
                self.warnings.append(
                    f"{what}: {ep.host} looks site-internal; network.block_private blocks it "
                    "if it resolves to a private address (add the address to the destination)"
                )
            if ep.scheme == "http":
                comments.append("  plain http: requests (and API keys) cross the network in clear")
            if ep.scheme == "http" and not ep.site_internal:
                self.warnings.append(
                    f"{what}: plain http:// to {ep.host} sends prompts (and any API key) in clear"
                )
        self.dest(want, purpose, hosts, (ep.port,), comments)

    def url_dest(self, want: str, purpose: str, url: UrlSetting, head: list[str]) -> bool:
        """A destination for a URL setting; a template and a warning when it cannot be."""
        what = f"{url.key} ({url.where})"
        if url.endpoint is not None:
            self.endpoint_dest(want, purpose, url.endpoint, head, what)
            return True
        if url.unresolved:
            why = (
                f"  {url.key} is {url.raw!r}: its host is known only when OpenCode runs "
                "({env:}/{file:} are not resolved here), so it is not in this policy. Add it:"
            )
            self.warnings.append(
                f"{what} is {url.raw!r}: host unknown until run time; "
                "not in the policy (a commented template is)"
            )
        else:
            why = f"  {url.key} is {url.raw!r}: {url.problem}; fix it, then add its host:"
            self.warnings.append(f"{what}: {url.problem}; not in the policy")
        self.template(want, purpose, "host.example", 443, [*head, why])
        return False

    # -- sections ---------------------------------------------------------------------

    def auth(self) -> None:
        self.use(
            "opencode-auth",
            [
                "OpenCode Zen / Go auth (api.opencode.ai): always added (documented minimal allowlist)"
            ],
        )

    def providers(self) -> None:
        found = oc.providers(self.cfg)
        self.warnings.extend(found.notes)
        self.trailer.extend(found.notes)
        if not found.used:
            self.warnings.append(
                "no provider in the config (model, small_model, agents, provider): OpenCode "
                "will pick one from your credentials; add its destination yourself"
            )
            self.template(
                "provider",
                "the LLM provider OpenCode uses",
                "api.provider.example",
                443,
                ["no provider named in the config (model / small_model / provider): add yours"],
            )
        for p in found.used:
            head = [f"provider {p.id}: from {', '.join(p.refs)}"]
            purpose = f"OpenCode provider {p.id}"
            if p.url is not None:
                if p.url_ignored:
                    head.append(
                        f"  note: OpenCode 1.18 ignores provider.{p.id}.baseURL; "
                        f"move it to provider.{p.id}.options.baseURL"
                    )
                    self.warnings.append(
                        f"provider.{p.id}.baseURL ({p.url.where}) is ignored by OpenCode 1.18; "
                        f"it reads provider.{p.id}.options.baseURL"
                    )
                head[0] = f"provider {p.id}: {p.url.key} ({p.url.where})"
                ep = p.url.endpoint
                entry = self.usable(p.catalog)
                if ep is not None and entry is not None and _covers(entry, ep):
                    self.use(entry.name, head)
                    continue
                self.url_dest(
                    destination_name(p.id, "provider"), purpose + " (custom baseURL)", p.url, head
                )
                continue
            entry = self.usable(p.catalog)
            if entry is not None:
                self.use(entry.name, head)
                continue
            self.warnings.append(
                f"provider {p.id!r} ({p.refs[0]}) has no baseURL and no catalog entry: "
                "its API host is not in the policy (a commented template is)"
            )
            self.template(
                destination_name(p.id, "provider"),
                purpose,
                "api.provider.example",
                443,
                [
                    *head,
                    f"  {p.id!r} is not in the catalog and sets no options.baseURL: "
                    "add its API host here",
                ],
            )

    def services(self) -> None:
        cfg = self.cfg
        upd = oc.autoupdate(cfg)
        where = cfg.where(("autoupdate",))
        if upd == "off":
            self.trailer.append(f'opencode-update not added: "autoupdate": false ({where})')
        else:
            why = {
                "on": (
                    f'"autoupdate": true ({where})'
                    if cfg.get("autoupdate") is not None
                    else "autoupdate is not set (OpenCode's default: true)"
                ),
                "notify": f'"autoupdate": "notify" ({where}) still checks for new versions',
                "unknown": f"autoupdate is {cfg.get('autoupdate')} ({where}): assumed on",
            }[upd]
            self.use("opencode-update", [f'{why}; turn it off with "autoupdate": false'])

        mode = oc.share(cfg)
        swhere = cfg.where(("share",))
        if mode == "disabled":
            self.trailer.append(f'opencode-share not added: "share": "disabled" ({swhere})')
        else:
            why = (
                'share is not set (OpenCode\'s default "manual": /share uploads a session)'
                if cfg.get("share") is None and cfg.get("autoshare") is None
                else f"share is {mode} ({swhere})"
            )
            head = [f'{why}; turn it off with "share": "disabled"']
            ent = oc.url_setting(cfg, ("enterprise", "url"))
            if ent is not None:
                head.append(f"  shares go to enterprise.url ({ent.where}), not opncd.ai")
                self.url_dest("opencode-enterprise", "OpenCode enterprise share service", ent, head)
            else:
                self.use("opencode-share", head)

        specs = oc.plugin_specs(cfg)
        npm = [(p, s) for p, s in specs if oc.is_npm_spec(s)]
        packages = sorted(
            {
                str(v["npm"])
                for v in cfg.mapping("provider").values()
                if isinstance(v, dict) and isinstance(v.get("npm"), str)
            }
        )
        if npm:
            listed = ", ".join(s for _, s in npm[:4]) + (" ..." if len(npm) > 4 else "")
            self.use("npm-registry", [f"plugin ({cfg.where(npm[0][0])}): {listed}"])
        else:
            if packages:
                self.trailer.append(
                    f"npm-registry for provider packages ({', '.join(packages)}): OpenCode "
                    "downloads a provider package it has not cached from registry.npmjs.org; "
                    "pre-install it (see docs/air-gapped.md) or add `- use: npm-registry`"
                )
            self.trailer.append(
                "npm-registry not added: no npm plugins. OpenCode still tries to install "
                "@opencode-ai/plugin into its config directories at start-up; that background "
                "install failing is only logged (and shows up as a block in the audit log)"
            )

    def remote_config(self, urls: Sequence[str]) -> None:
        if not urls:
            self.trailer.append(
                "no remote config host: if you use `opencode auth login <url>`, rerun with "
                "--remote-config <url> (OpenCode then fetches <url>/.well-known/opencode)"
            )
        for raw in urls:
            ep, _unresolved, problem = oc.parse_url(raw)
            if ep is None:  # checked by the CLI already
                raise ValueError(f"--remote-config {raw!r}: {problem or 'not a URL'}")
            self.endpoint_dest(
                "remote-config",
                "OpenCode remote config (.well-known/opencode)",
                ep,
                [
                    f"remote config: --remote-config {raw}: OpenCode fetches "
                    f"{raw.rstrip('/')}/.well-known/opencode at start-up",
                    "  if that document names a remote_config URL on another host, add that host too",
                ],
                f"--remote-config {raw}",
            )

    def mcp(self) -> None:
        for server in oc.mcp_servers(self.cfg):
            want = destination_name(f"mcp-{server.name}")
            if server.kind == "remote":
                if server.url is None:
                    self.warnings.append(
                        f"mcp.{server.name} ({server.where}) is remote but has no url"
                    )
                    continue
                head = [f"MCP server {server.name}: {server.url.key} ({server.url.where})"]
                if server.oauth:
                    head.append(
                        "  if it asks for OAuth, OpenCode also contacts its authorization "
                        "server: add that host if it differs"
                    )
                self.url_dest(want, f"MCP server {server.name} (remote)", server.url, head)
            elif server.kind == "local":
                cmd = f" (`{server.command}`)" if server.command else ""
                self.trailer.append(
                    f"local MCP server {server.name}{cmd} ({server.where}) runs as a child "
                    "process: its own traffic passes the guard only if it honours HTTPS_PROXY"
                )
            else:
                self.trailer.append(
                    f"mcp.{server.name} ({server.where}) has no type here (defined in remote "
                    "config?): if it is remote, add its host"
                )

    def remote_files(self) -> None:
        grouped: dict[tuple[str, str], list[UrlSetting]] = {}
        for url in oc.remote_urls(self.cfg):
            kind = "skills" if url.path[0] == "skills" else "instructions"
            host = url.endpoint.host if url.endpoint else url.raw
            grouped.setdefault((kind, host), []).append(url)
        for (kind, host), urls in grouped.items():
            first = urls[0]
            what = "remote instructions" if kind == "instructions" else "remote skills"
            head = [f"{what}: {', '.join(f'{u.key} ({u.where})' for u in urls)}"]
            ep = first.endpoint
            if ep is None:
                self.url_dest(destination_name(kind), f"OpenCode {what}", first, head)
                continue
            ports = tuple(sorted({u.endpoint.port for u in urls if u.endpoint}))
            self.dest(
                destination_name(f"{kind}-{host}"),
                f"OpenCode {what} fetched at start-up",
                LOOPBACK_NAME_HOSTS if ep.host == "localhost" else (ep.host,),
                ports,
                head,
            )

    def webfetch(self) -> None:
        state = oc.webfetch(self.cfg)
        if not state.enabled:
            self.trailer.append(f"webfetch not added: the tool is off by {state.why}")
            return
        self.notes.append(
            "the webfetch tool is on: it fetches any URL the agent asks for; list the hosts "
            'you allow in the commented webfetch block, or set "permission": {"webfetch": "deny"}'
        )
        self.template(
            "webfetch",
            "sites the webfetch tool may read",
            "docs.example.org",
            443,
            [
                f"webfetch tool is on ({state.why}); it fetches any URL the agent asks for.",
                "  It has no fixed hosts: list the ones you allow (uncomment and edit), or turn",
                '  the tool off with "permission": {"webfetch": "deny"}. Unlisted hosts stay blocked.',
            ],
        )

    def mdns(self) -> None:
        if self.cfg.get("server", "mdns") is True:
            self.warnings.append(
                f"server.mdns is true ({self.cfg.where(('server', 'mdns'))}): mDNS is UDP "
                'multicast and never passes an HTTP proxy; set "server": {"mdns": false}'
            )


def _covers(entry: CatalogEntry, ep: Endpoint) -> bool:
    return ep.host in entry.hosts and ep.port in entry.ports


def generate(
    cfg: OpenCodeConfig,
    catalog: Mapping[str, CatalogEntry],
    source: str,
    remote_config: Sequence[str] = (),
    deny: Sequence[DenyRule] | None = None,
) -> Generated:
    """The policy text for ``cfg``, with the warnings and notes meant for stderr.

    ``deny``: the deny rules to carry (default: the minimal preset's, e.g. the cloud
    metadata addresses, so a generated policy is never weaker than the preset).
    """
    if deny is None:
        deny = load_preset("minimal").deny
    b = _Builder(cfg, catalog, deny)
    b.auth()
    b.providers()
    b.services()
    b.remote_config(remote_config)
    b.mcp()
    b.remote_files()
    b.webfetch()
    b.mdns()
    return Generated(b.render(source), b.warnings, b.notes)
