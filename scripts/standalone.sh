#!/usr/bin/env bash
# Starts the standalone stack on this machine: a real single-node Consul server
# (persistent data in ./.standalone/consul) and Wayfinder's DNS on 127.0.0.1:53.
# Ctrl-C stops both. Override the listen address with LISTEN_IP.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release
state=.standalone
mkdir -p "$state/consul"

consul agent -server -bootstrap-expect 1 -ui -node "$(hostname)" \
  -data-dir "$state/consul" -bind 127.0.0.1 -client 127.0.0.1 \
  -hcl 'dns_config { enable_truncate = true }' >"$state/consul.log" 2>&1 &
consul_pid=$!
cleanup() { kill "$consul_pid" 2>/dev/null || true; wait "$consul_pid" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "consul: starting (log: $state/consul.log)"
leader=""
for _ in $(seq 1 150); do
  if ! kill -0 "$consul_pid" 2>/dev/null; then
    echo "consul exited; the end of its log:" >&2
    tail -5 "$state/consul.log" >&2
    exit 1
  fi
  leader=$(curl -fsS 127.0.0.1:8500/v1/status/leader 2>/dev/null || true)
  [ "${#leader}" -gt 2 ] && break
  sleep 0.2
done
[ "${#leader}" -gt 2 ] || { echo "consul elected no leader in 30 s; see $state/consul.log" >&2; exit 1; }

cat <<MSG
consul: ready at http://127.0.0.1:8500
wayfinder dns: starting on ${LISTEN_IP:-127.0.0.1}:53. Try, in another terminal:
  curl -X PUT -d '{"Name":"web","Address":"127.0.0.1","Port":8080}' 127.0.0.1:8500/v1/agent/service/register
  dig @${LISTEN_IP:-127.0.0.1} web.service.consul SRV
  dig @${LISTEN_IP:-127.0.0.1} anything.apps.127.0.0.1.nip.test
  dig @${LISTEN_IP:-127.0.0.1} example.org
MSG
target/release/wayfinder dns -c deploy/standalone.toml &
wait $!
