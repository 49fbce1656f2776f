#!/usr/bin/env bash
# Builds test binaries for Windows (x86_64-pc-windows-gnu, Debian's mingw) and runs them
# under Debian's Wine 8. Idempotent: installs only what is missing.
#   bash .ci/windows.sh [cargo test args...]   (default: the suites listed below)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
[ -x /usr/lib/wine/wine64 ] || need+=(wine64)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx x86_64-pc-windows-gnu || rustup target add x86_64-pc-windows-gnu

export WINEPREFIX="${WINEPREFIX:-$HOME/.wine-wsbeat}"
export WINEDEBUG=-all
wine=/usr/lib/wine/wine64
# Current Rust std needs ProcessPrng (bcryptprimitives.dll), which Wine 8 lacks: a shim
# DLL on top of RtlGenRandom, built from .ci/processprng.c.
dll="$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
if [ ! -f "$dll" ]; then
    [ -d "$WINEPREFIX/drive_c/windows/system32" ] || "$wine" wineboot --init >/dev/null 2>&1 || true
    out="$(mktemp -d)"
    x86_64-w64-mingw32-gcc -O2 -shared -o "$out/bcryptprimitives.dll" .ci/processprng.c -ladvapi32
    cp "$out/bcryptprimitives.dll" "$dll"
fi

export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$wine"
if (($#)); then
    cargo test --target x86_64-pc-windows-gnu "$@"
else
    # The Windows code paths linted as the Linux ones are.
    cargo clippy --lib --target x86_64-pc-windows-gnu -- -D warnings
    # Two inbound tests of the write-stall rule run for seconds and use no code of their
    # own per platform (the socket calls they reach run in the test before them): Linux
    # only, to keep the whole CI under 15 minutes.
    # The race suite's windows are the same code on every platform: 60 rounds of each
    # under Wine (where a round takes 3-5 times as long) instead of 200.
    WSBEAT_RACE_ITERS="${WSBEAT_RACE_ITERS:-60}" \
        cargo test --target x86_64-pc-windows-gnu --lib --test core --test heartbeat --test reconnect --test races --test inbound --test no_send_queue_figure -- \
        --skip an_echo_server_survives_a_consumer_that_pauses_again_and_again \
        --skip a_peer_that_never_reads_is_judged_once_the_consumer_caught_up
    # The keepalive settings (Windows caps the probe count, and Wine has no TCP_KEEPCNT).
    cargo test --target x86_64-pc-windows-gnu --test hardening keepalive
fi
