#!/usr/bin/env bash
# The README's quick start: the whole standalone stack on this machine with one
# command. Installs what is missing (Consul, ...), builds, then runs
# `wayfinder up -c deploy/standalone.toml`, which starts a single-node Consul
# server (state in .standalone/consul), dns on 127.0.0.1:53, the lb on
# 127.0.0.1:80 and the status page on http://127.0.0.1:9000/, and prints where
# everything is with a `dig` and a `curl` to try. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --bin wayfinder
mkdir -p .standalone
exec target/release/wayfinder up -c deploy/standalone.toml
