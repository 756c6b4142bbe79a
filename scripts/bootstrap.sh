#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 found on this machine and install egress-guard into it.
# Looks on PATH first (python3.13, python3.12, python3, python), then in pyenv's versions.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"   # "dev" for the test tools

ok_python() {  # prints the interpreter path if it runs and is >= 3.12
  local py="$1"
  "$py" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1 || return 1
  "$py" -c 'import sys; print(sys.executable)'
}

find_python() {
  local c found
  for c in python3.14 python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && found="$(ok_python "$c")"; then echo "$found"; return 0; fi
  done
  local pyroot="${PYENV_ROOT:-}"
  if [ -z "$pyroot" ] && command -v pyenv >/dev/null 2>&1; then pyroot="$(pyenv root 2>/dev/null || true)"; fi
  [ -n "$pyroot" ] || pyroot="$HOME/.pyenv"
  if [ -d "$pyroot/versions" ]; then
    for c in $(ls -d "$pyroot"/versions/3.* 2>/dev/null | sort -V -r); do
      if [ -x "$c/bin/python3" ] && found="$(ok_python "$c/bin/python3")"; then echo "$found"; return 0; fi
    done
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! ok_python "$venv/bin/python" >/dev/null; then
  if ! py="$(find_python)"; then
    echo "egress-guard: no Python >= 3.12 found (looked on PATH and in pyenv's versions)." >&2
    echo "  install one, e.g. 'pyenv install 3.12' or your distribution's python3.12 package," >&2
    echo "  then run this again." >&2
    exit 1
  fi
  echo "egress-guard: creating .venv with $py" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

spec="."
[ "$extras" = "dev" ] && spec=".[dev]"
hash="$(sha256sum < "$root/pyproject.toml" | cut -c1-16)"
stamp="$venv/.installed-$hash-${extras:-base}"
# A venv set up for the tests (dev extras) already has everything `run` needs.
if [ -z "$extras" ] && [ -f "$venv/.installed-$hash-dev" ]; then
  stamp="$venv/.installed-$hash-dev"
fi
if [ ! -f "$stamp" ]; then
  echo "egress-guard: installing $spec into .venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  (cd "$root" && "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec") >&2
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
