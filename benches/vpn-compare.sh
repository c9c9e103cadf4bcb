#!/usr/bin/env bash
# WireGuard throughput: Wayfinder's vpn as the server vs wireguard-go as the
# server, with wireguard-go as the client (the "laptop") in every case. Two
# network namespaces (laptop, server) joined by one veth; both servers run side
# by side on their own port and tunnel subnet, so rounds alternate between them
# without restarts. See benches/README.md for how to read the output.
#
#   benches/vpn-compare.sh                  # ROUNDS=3 SECONDS=8
#   ROUNDS=1 SECONDS=4 benches/vpn-compare.sh
#
# Environment (all optional):
#   ROUNDS      rounds; every round measures both servers in both directions  (3)
#   SECONDS     length of one iperf3 run                                       (8)
#   KEEP_TMP=1  keep the temp dir (configs, logs, raw iperf3 JSON)
#
# Each run: iperf3 TCP (one stream) for SECONDS from the laptop to the server
# ("up") and with -R ("down") through the tunnel. Reported: Gbit/s received, and
# the server's CPU seconds per Gbit moved (utime + stime of the server process,
# all threads, from /proc/PID/stat before and after the run). The order of the two
# servers flips every round; the summary gives the medians and the median of the
# per-round ratios wayfinder / wireguard-go. Not part of the test suite.
set -euo pipefail

run_seconds=$SECONDS
[ "$run_seconds" -gt 0 ] 2>/dev/null || run_seconds=8
SECONDS=0
rounds=${ROUNDS:-3}

BENCH_NAME='vpn-compare'
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== vpn-compare: wayfinder vpn vs wireguard-go as the server (client: wireguard-go), iperf3 TCP"
echo "command:  ROUNDS=$rounds SECONDS=$run_seconds $0 $*"
print_machine

apt_install_missing wireguard-go wireguard-tools iperf3 iproute2 python3
build_wayfinder "$repo"
setup_tmp

tag=$(($$ % 100000))
ns_l="wfbl$tag"
ns_s="wfbs$tag"
if_wf="wfbw$tag"   # wayfinder's TUN in the server namespace
if_wgs="wfbg$tag"  # wireguard-go server
if_c1="wfbc$tag"   # laptop client towards wayfinder
if_c2="wfbd$tag"   # laptop client towards wireguard-go

# Processes first (they keep a namespace alive), then the namespaces and any
# control socket a killed wireguard-go left behind.
vpn_cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$ns_l" 2>/dev/null || true
  ip netns del "$ns_s" 2>/dev/null || true
  rm -f /var/run/wireguard/{"$if_wf","$if_wgs","$if_c1","$if_c2"}.sock
  (exit "$status")
  cleanup
}
trap vpn_cleanup EXIT

L() { ip netns exec "$ns_l" "$@"; }
S() { ip netns exec "$ns_s" "$@"; }

as_root ip netns add "$ns_l"
ip netns add "$ns_s"
ip -n "$ns_l" link set lo up
ip -n "$ns_s" link set lo up
ip -n "$ns_s" link add wan0 type veth peer name wan1 netns "$ns_l"
ip -n "$ns_s" addr add 10.250.0.1/24 dev wan0
ip -n "$ns_l" addr add 10.250.0.2/24 dev wan1
ip -n "$ns_s" link set wan0 up
ip -n "$ns_l" link set wan1 up

wait_sock() {
  for _ in $(seq 100); do [ -S "/var/run/wireguard/$1.sock" ] && return 0; sleep 0.05; done
  die "no control socket for $1"
}

# Configures laptop client interface $1 from wg-quick file $2.
client_from_conf() {
  local ifname=$1 conf=$2
  cp "$conf" "$tmp/$ifname.conf"
  wg-quick strip "$tmp/$ifname.conf" >"$tmp/$ifname.stripped"
  wg setconf "$ifname" "$tmp/$ifname.stripped"
  ip -n "$ns_l" addr add "$(awk -F' = ' '/^Address/ {print $2}' "$conf")" dev "$ifname"
  ip -n "$ns_l" link set "$ifname" mtu 1420 up
  local net
  for net in $(awk -F' = ' '/^AllowedIPs/ {gsub(",", " ", $2); print $2}' "$conf"); do
    ip -n "$ns_l" route add "$net" dev "$ifname"
  done
}

# Wayfinder's server and its laptop client, configured from `peer add`.
cat >"$tmp/wayfinder.toml" <<TOML
[dns]
upstreams = ["127.0.0.1:9"]
[vpn]
interface = "$if_wf"
dir = "$tmp/vpn"
address = "10.200.0.1/24"
listen = "0.0.0.0:51820"
endpoint = "10.250.0.1:51820"
TOML
"$wayfinder" vpn peer add bench -c "$tmp/wayfinder.toml" >"$tmp/client-wf.conf" 2>"$tmp/peer-add.log" \
  || die "peer add failed: $(cat "$tmp/peer-add.log")"
RUST_LOG=warn start wayfinder ip netns exec "$ns_s" "$wayfinder" vpn -c "$tmp/wayfinder.toml"
wait_sock "$if_wf"
start client-wf ip netns exec "$ns_l" wireguard-go -f "$if_c1"
wait_sock "$if_c1"
client_from_conf "$if_c1" "$tmp/client-wf.conf"

# wireguard-go as the server, same MTU, its own subnet and port.
umask 077
wg genkey >"$tmp/wgs.key"
wg pubkey <"$tmp/wgs.key" >"$tmp/wgs.pub"
wg genkey >"$tmp/wgc.key"
wg pubkey <"$tmp/wgc.key" >"$tmp/wgc.pub"
start wireguard-go ip netns exec "$ns_s" wireguard-go -f "$if_wgs"
wait_sock "$if_wgs"
wg set "$if_wgs" listen-port 51821 private-key "$tmp/wgs.key" peer "$(cat "$tmp/wgc.pub")" allowed-ips 10.201.0.2/32
ip -n "$ns_s" addr add 10.201.0.1/24 dev "$if_wgs"
ip -n "$ns_s" link set "$if_wgs" mtu 1420 up
cat >"$tmp/client-wgs.conf" <<CONF
[Interface]
PrivateKey = $(cat "$tmp/wgc.key")
Address = 10.201.0.2/32

[Peer]
PublicKey = $(cat "$tmp/wgs.pub")
Endpoint = 10.250.0.1:51821
AllowedIPs = 10.201.0.0/24
PersistentKeepalive = 25
CONF
start client-wgs ip netns exec "$ns_l" wireguard-go -f "$if_c2"
wait_sock "$if_c2"
client_from_conf "$if_c2" "$tmp/client-wgs.conf"

start iperf3 ip netns exec "$ns_s" iperf3 -s
for target in 10.200.0.1 10.201.0.1; do
  ok=0
  for _ in $(seq 50); do
    if L ping -c 1 -W 1 "$target" >/dev/null 2>&1; then ok=1; break; fi
  done
  [ $ok = 1 ] || die "no ping through the tunnel to $target"
done
check_alive

hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure SERVER DIRECTION: one iperf3 run; appends "server dir gbps cpu_per_gbit" to $tmp/results.
measure() {
  local server=$1 dir=$2 target pid flag=""
  case $server in
    wayfinder) target=10.200.0.1; pid=${pid_of[wayfinder]} ;;
    wireguard-go) target=10.201.0.1; pid=${pid_of[wireguard-go]} ;;
  esac
  [ "$dir" = down ] && flag=-R
  local before after json="$tmp/iperf-$server-$dir-$round.json"
  before=$(cpu_ticks "$pid")
  L iperf3 -c "$target" -t "$run_seconds" -J $flag >"$json" || die "iperf3 against $server failed"
  after=$(cpu_ticks "$pid")
  python3 - "$json" "$server" "$dir" "$((after - before))" "$hz" "$run_seconds" >>"$tmp/results" <<'PY'
import json, sys
path, server, direction, ticks, hz, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
data = json.load(open(path))
bps = data["end"]["sum_received"]["bits_per_second"]
gbit = bps / 1e9
moved = gbit * secs
cpu = ticks / hz
print(f"{server} {direction} {gbit:.3f} {cpu / moved if moved else 0:.3f}")
PY
  tail -1 "$tmp/results" | awk -v r="$round" '{printf "round %d  %-13s %-4s %6.3f Gbit/s  %6.3f server CPU-s/Gbit\n", r, $1, $2, $3, $4}'
}

: >"$tmp/results"
for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 1 ]; then order="wayfinder wireguard-go"; else order="wireguard-go wayfinder"; fi
  for dir in up down; do
    for server in $order; do
      measure "$server" "$dir"
      check_alive
    done
  done
done

echo "== summary (median over $rounds rounds; ratio = median of per-round wayfinder/wireguard-go)"
python3 - "$tmp/results" "$rounds" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for direction in ("up", "down"):
    wf = [(float(r[2]), float(r[3])) for r in rows if r[0] == "wayfinder" and r[1] == direction]
    wg = [(float(r[2]), float(r[3])) for r in rows if r[0] == "wireguard-go" and r[1] == direction]
    ratios = [a[0] / b[0] for a, b in zip(wf, wg) if b[0] > 0]
    print(f"{direction:<5} wayfinder {statistics.median(x[0] for x in wf):.3f} Gbit/s ({statistics.median(x[1] for x in wf):.2f} CPU-s/Gbit)"
          f"   wireguard-go {statistics.median(x[0] for x in wg):.3f} Gbit/s ({statistics.median(x[1] for x in wg):.2f} CPU-s/Gbit)"
          f"   ratio {statistics.median(ratios):.2f}x")
PY
echo "vpn-compare: done in ${SECONDS}s"
