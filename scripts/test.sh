#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (Consul,
# dig, unbound, ...), then checks formatting and lints, then runs every test
# (unit, in-process with real sockets, black-box against the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
