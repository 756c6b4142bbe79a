#!/usr/bin/env bash
# Real peers the integration tests talk to: curl and openssl as clients.
# Installed with apt when missing (CI and fresh machines run as root).
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "egress-guard: installing ${need[*]}" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  else
    echo "egress-guard: missing ${need[*]}; install them to run the integration tests" >&2
  fi
fi
