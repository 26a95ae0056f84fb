#!/usr/bin/env bash
# Set up what `make demo` and `make test` need on a fresh Debian/Ubuntu machine:
# a Python >= 3.11 with venv, redis-server, chromium (the dashboard's browser test), promtool, iproute2, then
# .venv/ with the project installed (editable, with test extras),
# every dependency pinned by requirements.lock (`make lock` refreshes it).
# Idempotent: a second run only re-installs when pyproject.toml or requirements.lock changed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: need $* but apt-get is not available; install it with your package manager" >&2
    exit 1
  fi
  if [ $apt_updated -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq >/dev/null
    apt_updated=1
  fi
  echo "bootstrap: apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

find_python() {
  for cand in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

PY=$(find_python || true)
if [ -z "$PY" ]; then
  apt_install python3 python3-venv
  PY=$(find_python || true)
  [ -n "$PY" ] || { echo "bootstrap: Python >= 3.11 is required (found $(python3 --version 2>&1))" >&2; exit 1; }
fi

if ! command -v redis-server >/dev/null 2>&1; then
  apt_install redis-server
fi
# The dashboard's browser test (tests/e2e/test_dashboard.py) drives Debian's chromium through Playwright.
if [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
fi
# promtool (Debian's prometheus package): the tests check real scrapes, the alert rules and their unit tests with it.
# Nothing here starts a Prometheus server.
if ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus
fi
# iproute2 (`ip netns`, veth, bridge): the multi-host test (tests/e2e/test_hosts.py) puts each host in a namespace.
if ! command -v ip >/dev/null 2>&1; then
  apt_install iproute2
fi

STAMP=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python${ver}-venv" || apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ requirements.lock -nt "$STAMP" ]; then
  echo "bootstrap: installing kling-relay and its dependencies into .venv/ (first run takes a minute)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -c requirements.lock -e '.[dev]'; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "bootstrap: pip install failed; full log in $log" >&2
    exit 1
  fi
  touch "$STAMP"
fi
