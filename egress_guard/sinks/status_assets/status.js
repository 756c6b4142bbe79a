// egress-guard status page. Polls status.json once a second and rebuilds the tables.
// Every value is set with textContent (never innerHTML): hosts, paths and reasons come
// from clients and must show as text, not run as markup.
"use strict";

const POLL_MS = 1000;
let lastSeq = 0;
let latest = null;

function $(id) { return document.getElementById(id); }

function setText(id, value) {
  $(id).textContent = value === null || value === undefined || value === "" ? "-" : String(value);
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + sec + "s";
}

function clock(ts) { return ts ? ts.replace("T", " ").replace("Z", "") : ""; }

function renderHeader(s) {
  const badge = $("health");
  const ok = s.healthy !== false && (!s.audit.configured || s.audit.healthy);
  badge.textContent = ok ? "healthy" : "refusing traffic";
  badge.className = "badge " + (ok ? "ok" : "bad");
  setText("updated", "updated " + clock(s.now) + " UTC");
}

function renderPolicy(p) {
  setText("policy-source", p.loaded ? p.source : "no policy loaded");
  setText("policy-sha256", p.sha256);
  setText("policy-version", p.loaded ? p.version : null);
  setText("policy-mode", p.mode);
  setText("policy-destinations", p.loaded ? p.destinations : null);
  setText("policy-loaded", clock(p.loaded_at));
  setText("policy-reloads", p.reloads_ok + " ok, " + p.reloads_error + " failed");
  const err = $("policy-error");
  if (p.last_error) {
    err.hidden = false;
    err.textContent = "last failed load " + clock(p.last_error.ts) + ": " + (p.last_error.error || "");
  } else {
    err.hidden = true;
  }
}

function renderAudit(a) {
  setText("audit-state", !a.configured ? "not configured (--audit-log)" : a.healthy ? "writing" : "FAILING: new traffic refused");
  setText("audit-errors", a.write_errors);
  setText("audit-dropped", a.events_dropped);
}

function renderDestinations(rows) {
  const body = document.createElement("tbody");
  for (const d of rows) {
    const tr = document.createElement("tr");
    cell(tr, d.name);
    cell(tr, d.allow, "num");
    cell(tr, d.block, "num" + (d.block ? " decision-block" : ""));
    cell(tr, d.would_block, "num" + (d.would_block ? " decision-would_block" : ""));
    cell(tr, d.connections, "num");
    cell(tr, bytes(d.bytes_up), "num");
    cell(tr, bytes(d.bytes_down), "num");
    cell(tr, clock(d.last_seen));
    body.appendChild(tr);
  }
  $("destinations").replaceChild(body, $("destinations").tBodies[0]);
}

function renderDecisions(s) {
  const rows = $("blocks-only").checked ? s.recent_blocks : s.recent;
  const body = document.createElement("tbody");
  let top = lastSeq;
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.decision = r.decision || "";
    if (lastSeq && r.seq > lastSeq) tr.className = "new";
    top = Math.max(top, r.seq);
    cell(tr, clock(r.ts));
    cell(tr, r.decision, "decision-" + r.decision);
    cell(tr, r.host).title = r.sni ? "SNI " + r.sni : "";
    cell(tr, r.port, "num");
    cell(tr, r.reason).title = r.detail || "";
    cell(tr, r.destination || (r.catalog ? "catalog: " + r.catalog : ""));
    cell(tr, r.method ? r.method + (r.path ? " " + r.path : "") : "");
    cell(tr, r.client);
    cell(tr, r.user || "");
    body.appendChild(tr);
  }
  lastSeq = top;
  $("decisions").replaceChild(body, $("decisions").tBodies[0]);
  $("no-decisions").hidden = rows.length > 0;
}

function render(s) {
  latest = s;
  renderHeader(s);
  renderPolicy(s.policy);
  renderAudit(s.audit);
  setText("started", clock(s.started) + " UTC");
  setText("uptime", duration(s.uptime_s));
  renderDestinations(s.destinations);
  renderDecisions(s);
}

async function poll() {
  if (!$("paused").checked) {
    try {
      const r = await fetch("status.json", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
    } catch (e) {
      const badge = $("health");
      badge.textContent = "unreachable";
      badge.className = "badge unknown";
    }
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("blocks-only").addEventListener("change", () => { if (latest) renderDecisions(latest); });
  poll();
});
