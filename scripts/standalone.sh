#!/usr/bin/env bash
# The README's quick start: the whole standalone stack on this machine with one
# command. Installs what is missing (Consul, ...), builds, then runs
# `wayfinder up -c deploy/standalone.toml`, which starts a single-node Consul
# server (state in .standalone/consul), dns on 127.0.0.1:53, the lb on
# 127.0.0.1:80 and the status page on http://127.0.0.1:9000/, and prints where
# everything is with a `dig` and a `curl` to try. Ctrl-C stops it all.
#
#   START_VPN=true HOST_IP=<this host's address> scripts/standalone.sh   # with the vpn
#   WAYFINDER_BIN=target/debug/wayfinder scripts/standalone.sh         # a binary built already
#
# WAYFINDER_BIN runs that binary instead of building the release one (the
# quick-start test in tests/integration/quick_start.rs passes the binary it was
# built with, so its fresh clone is not built a second time).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
if [ -n "${WAYFINDER_BIN:-}" ]; then
  bin=$WAYFINDER_BIN
else
  cargo build --release --bin wayfinder
  bin=target/release/wayfinder
fi
mkdir -p .standalone
exec "$bin" up -c deploy/standalone.toml
