#!/bin/sh
# Regenerates the checked-in test PKI in this directory: `sh tests/certs/gen.sh`.
# It is the same PKI the nginx interop tests make at test time, so one script
# (tests/peers/gen_certs.sh) holds the commands for both.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
sh "$HERE/../peers/gen_certs.sh" "$HERE"
