#!/usr/bin/env bash
# Real peers the integration tests talk to: curl and openssl as clients, iproute2,
# nftables and iptables for the network namespaces and redirect rules (egress-guard
# sandbox, transparent mode in tests/deploy), and the
# distribution's Chromium for the status page's browser test (Playwright, from the dev
# extra, drives it; `playwright install` is never needed).
# Installed with apt when missing (CI and fresh machines run as root).
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need+=(chromium)
fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "egress-guard: installing ${need[*]}" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  else
    echo "egress-guard: missing ${need[*]}; install them to run the integration tests" >&2
  fi
fi

# The real OpenCode for the end-to-end tests, from the npm registry, pinned to the version
# whose traffic DESIGN.md section 9 describes. Kept in .cache/ (git-ignored).
OPENCODE_VERSION="${OPENCODE_VERSION:-1.18.33}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
oc_dir="$root/.cache/opencode"
if [ ! -x "$oc_dir/node_modules/.bin/opencode" ] || \
   [ "$("$oc_dir/node_modules/.bin/opencode" --version 2>/dev/null)" != "$OPENCODE_VERSION" ]; then
  if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2 || true
  fi
  if command -v npm >/dev/null 2>&1; then
    echo "egress-guard: installing opencode-ai@$OPENCODE_VERSION for the end-to-end tests" >&2
    mkdir -p "$oc_dir"
    (cd "$oc_dir" && timeout 600 npm install --no-audit --no-fund --loglevel=error \
        "opencode-ai@$OPENCODE_VERSION" >&2) \
      || echo "egress-guard: npm install opencode-ai failed; the OpenCode end-to-end tests will be skipped" >&2
  else
    echo "egress-guard: npm not found; the OpenCode end-to-end tests will be skipped" >&2
  fi
fi
