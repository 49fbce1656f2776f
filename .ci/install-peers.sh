#!/bin/sh
# Installs the third-party peers of the interop tests (tests/interop_*.rs):
#   - nginx, tinyproxy, openssl,     (Debian packages)
#     dante-server, microsocks
#   - iptables                       (Debian; the half-open requeue test, root only)
#   - websockets 17.x                (PyPI, into the python3 found on PATH)
#   - ws 8.x                         (npm, into tests/peers/node_modules, from the
#                                     committed tests/peers/package-lock.json)
# Idempotent: every step is skipped when what it installs is already there.
# Run as root from anywhere: `sh .ci/install-peers.sh`.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS="$ROOT/tests/peers"
say() { printf 'install-peers: %s\n' "$*"; }

# --- Debian packages ------------------------------------------------------------
# binary:package pairs; node, npm and python3 normally come with the machine image.
missing=""
for pair in nginx:nginx tinyproxy:tinyproxy openssl:openssl iptables:iptables node:nodejs npm:npm \
            python3:python3 danted:dante-server microsocks:microsocks; do
  bin=${pair%%:*}
  pkg=${pair#*:}
  if ! command -v "$bin" >/dev/null 2>&1; then
    missing="$missing $pkg"
  fi
done
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  missing="$missing python3-pip"
fi
if [ -n "$missing" ]; then
  say "apt-get install:$missing"
  # Debian's nginx, tinyproxy and dante-server packages start a system-wide daemon
  # (ports 80, 8888, 1080) on install unless policy-rc.d forbids it; the tests start
  # their own.
  made_policy=""
  if ! [ -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  apt-get install -y -q --no-install-recommends $missing
  if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
else
  say "nginx, tinyproxy, openssl, node, npm, python3, danted, microsocks: already installed"
fi

# --- Python websockets ------------------------------------------------------------
PY=${WSBEAT_PYTHON:-python3}
if "$PY" -c 'import sys, websockets; sys.exit(0 if websockets.version.version.startswith("17.") else 1)' 2>/dev/null; then
  say "python websockets: already installed"
else
  say "pip install websockets==17.*"
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  "$PY" -m pip install -q 'websockets==17.*' \
    || "$PY" -m pip install -q --break-system-packages 'websockets==17.*'
fi

# --- Node ws ----------------------------------------------------------------------
if [ -f "$PEERS/node_modules/ws/package.json" ] \
  && node -e 'process.exit(require(process.argv[1]).version.startsWith("8.") ? 0 : 1)' \
     "$PEERS/node_modules/ws/package.json" 2>/dev/null; then
  say "node ws: already installed"
else
  say "npm ci (ws@8) in tests/peers"
  (cd "$PEERS" && npm ci --no-audit --no-fund --loglevel=error)
fi

# --- localhost on both families ----------------------------------------------------
# The Happy Eyeballs test (tests/connect_setup.rs) needs `localhost` to resolve to ::1
# and 127.0.0.1, as Debian's default /etc/hosts has it; some container images map it to
# 127.0.0.1 only. Added only where ::1 exists on lo and is missing for localhost.
if grep -q '^00000000000000000000000000000001 ' /proc/net/if_inet6 2>/dev/null \
  && ! getent ahosts localhost | grep -q '^::1 '; then
  say "adding '::1 localhost' to /etc/hosts"
  echo '::1 localhost' >> /etc/hosts
fi

say "versions: $(nginx -v 2>&1 | tr -d '\n'); $(tinyproxy -v 2>&1 | head -n1); $(openssl version)"
say "versions: $(danted -v 2>&1 | head -n1 | cut -d' ' -f1-2); microsocks $(dpkg-query -W -f '${Version}' microsocks 2>/dev/null)"
say "versions: python $("$PY" -c 'import sys, websockets; print(sys.version.split()[0], "websockets", websockets.version.version)'); node $(node --version) ws $(node -p 'require(process.argv[1]).version' "$PEERS/node_modules/ws/package.json")"
