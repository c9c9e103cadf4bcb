#!/usr/bin/env bash
# The README's quick start: the whole standalone stack on this machine with one
# command. Installs what is missing (Consul, ...), builds, then runs
# `wayfinder up -c deploy/standalone.toml`, which starts a single-node Consul
# server (state in .standalone/consul), dns on 127.0.0.1:53, the lb on
# 127.0.0.1:80, the register component following Docker and the status page on
# http://127.0.0.1:9000/, and prints where everything is with a `docker run`,
# a `dig` and a `curl` to try. Ctrl-C stops it all. Without a Docker daemon
# answering, it runs one for the session (state in .standalone/docker).
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

# Docker: the register component follows this host's daemon (DOCKER_HOST, else
# /var/run/docker.sock). When none answers (a fresh machine: docker.io is
# installed but not started), this script runs one for the session, with its
# state in .standalone/docker, and stops it when `up` ends.
dockerd_pid=
if ! docker version >/dev/null 2>&1; then
  sock=$PWD/.standalone/docker.sock
  echo "standalone: no Docker daemon answers; starting dockerd (unix://$sock, log .standalone/dockerd.log)"
  rm -f "$sock"
  setsid dockerd --host "unix://$sock" --data-root "$PWD/.standalone/docker" \
    --exec-root "$PWD/.standalone/docker-exec" --pidfile "$PWD/.standalone/docker.pid" \
    >.standalone/dockerd.log 2>&1 &
  dockerd_pid=$!
  export DOCKER_HOST=unix://$sock
  for _ in $(seq 1 150); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.2
  done
  if ! docker version >/dev/null 2>&1; then
    echo "standalone: dockerd did not start; its log:" >&2
    tail -n 20 .standalone/dockerd.log >&2
    kill "$dockerd_pid" 2>/dev/null || true
    exit 1
  fi
fi
stop_docker() {
  if [ -n "$dockerd_pid" ]; then
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    echo "standalone: docker stopped"
  fi
}
trap stop_docker EXIT
# The banner's `docker run ... wayfinder/demo` (a 2 MB busybox app, no registry).
scripts/demo-image.sh

# Ctrl-C reaches `up` (dockerd runs in its own session); the trap then stops dockerd.
"$bin" up -c deploy/standalone.toml
