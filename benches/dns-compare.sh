#!/usr/bin/env bash
# Side-by-side DNS benchmark: Wayfinder vs dnsmasq (as PanteraS ran it) vs unbound
# (two threads, the strongest peer), all on 127.0.0.1, all in front of the same
# Consul dev agent and the same upstream resolver (a second unbound serving a
# local `bench.` zone). See benches/README.md for how to read the output.
#
#   benches/dns-compare.sh                  # ROUNDS=3 SECONDS=5
#   ROUNDS=5 SECONDS=10 benches/dns-compare.sh
#
# Environment (all optional):
#   ROUNDS        rounds; every round measures every mix on every server   (3)
#   SECONDS       length of one throughput run, seconds                   (5)
#   LAT_SECONDS   length of one fixed-rate latency run, seconds; 0 = skip  (2)
#   LAT_QPS       query rate of the latency runs, wildcard and cached      (10000)
#   CONSUL_LAT_QPS  the same for the consul mix (Consul's own limit is ~20k) (3000)
#   CLIENTS       dnsperf -c: client sockets                               (20)
#   OUTSTANDING   dnsperf -q: queries in flight                            (200)
#   DNSPERF_CPU   CPU list dnsperf is pinned to with taskset; empty = none (last CPU)
#   CONSUL_SERVICES  services registered in Consul for the consul mix      (50)
#   CONSUL_INSTANCES instances per service                                 (2)
#   MIXES         the mixes to measure, of: wildcard cached consul forward (all)
#                 (forward: 1000 upstream names answered with TTL 0, so every
#                 question is forwarded: the cost of one upstream exchange)
#   SERVERS       the servers to measure, of: wayfinder dnsmasq unbound    (all)
#   KEEP_TMP=1    keep the temp dir (configs, logs, raw dnsperf output)
#   WAYFINDER     a wayfinder binary to measure instead of building this tree
#
# Method (shared/notes/environment.md): absolute numbers on a 2-core shared machine
# swing by +-40%, so the three servers are measured in alternating order within
# every round (the starting server rotates per round), each with identical dnsperf
# settings, and the table reports medians and the median of the per-round ratios.
#
# Load generator: `dnsperf -T 1` is one sender + one receiver thread; with
# DNSPERF_CPU (default: the last CPU) both are pinned to one core by taskset, so the
# load generator never takes more than one core from the server under test.
# `-c 20 -q 200`: 20 source ports (spread over SO_REUSEPORT sockets), 200 queries
# in flight. `-t 2`: a query unanswered after 2 s counts as lost.
#
# Throughput runs saturate the server, so their average latency is ~ OUTSTANDING/QPS
# (Little's law) and says nothing new; p50/p99 come from separate runs at a fixed
# rate below saturation (`-Q LAT_QPS -v`, CONSUL_LAT_QPS for the consul mix; every
# response's latency is logged and sorted here): dnsperf 2.10 has no latency
# histogram of its own.
#
# CPU: for every throughput run the script records the CPU the server process used
# (/proc/PID/stat, all threads) and the CPU dnsperf used (bash `time`). On a 2-core
# machine one dnsperf core tops out near the cache-answer capacity of one server
# core, so for the wildcard and cached mixes QPS is often capped by the load
# generator ("gen cpu" ~100%); "QPS/core" (QPS per server CPU-second) then shows the
# servers' capacity per core. See benches/README.md.
#
# Exit status: 0 when every measurement ran (targets met or not: this is a
# measurement, not a test); non-zero when a server fails to start or to answer.
set -euo pipefail

# SECONDS is bash's elapsed-time counter: an inherited value is its start, so read
# it before anything else (0 means "not given").
run_seconds=$SECONDS
[ "$run_seconds" -gt 0 ] 2>/dev/null || run_seconds=5
SECONDS=0
rounds=${ROUNDS:-3}
lat_seconds=${LAT_SECONDS:-2}
lat_qps=${LAT_QPS:-10000}
consul_lat_qps=${CONSUL_LAT_QPS:-3000}
clients=${CLIENTS:-20}
outstanding=${OUTSTANDING:-200}
consul_services=${CONSUL_SERVICES:-50}
consul_instances=${CONSUL_INSTANCES:-2}
ncpu=$(nproc)
dnsperf_cpu=${DNSPERF_CPU-$((ncpu - 1))}

BENCH_NAME='dns-compare'
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== dns-compare: Wayfinder vs dnsmasq vs unbound"
echo "command:  ROUNDS=$rounds SECONDS=$run_seconds LAT_SECONDS=$lat_seconds LAT_QPS=$lat_qps CONSUL_LAT_QPS=$consul_lat_qps CLIENTS=$clients OUTSTANDING=$outstanding DNSPERF_CPU=${dnsperf_cpu:-none} $0 $*"
print_machine

scripts/install-deps.sh --bench
echo "versions: $(dnsmasq --version | head -1 | awk '{print "dnsmasq", $3}'), unbound $(unbound -V | awk '/^Version/ {print $2}'), $(consul version | head -1), $(dnsperf -h 2>&1 | awk '/^Version/ {print "dnsperf", $2; exit}')"
build_wayfinder "$repo"

setup_tmp

# --- ports: free on 127.0.0.1 for both UDP and TCP -------------------------------
read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_up p_wf p_dm p_ub < <(free_ports 10)
echo "ports:    consul http=$p_http dns=$p_cdns, upstream=$p_up, wayfinder=$p_wf, dnsmasq=$p_dm, unbound=$p_ub"

# --- Consul dev agent with CONSUL_SERVICES services x CONSUL_INSTANCES instances ----
start_consul "$p_http" "$p_cdns" "$p_grpc" "$p_serf_lan" "$p_serf_wan" "$p_server" \
  'dns_config { enable_truncate = true }' 'disable_update_check = true'
last_svc=$((consul_services - 1))
for i in $(seq 0 "$last_svc"); do
  for j in $(seq 1 "$consul_instances"); do
    curl -sf --max-time 5 -X PUT "http://127.0.0.1:$p_http/v1/agent/service/register" \
      -d "{\"ID\":\"svc$i-$j\",\"Name\":\"svc$i\",\"Address\":\"10.2.$((i % 250)).$j\",\"Port\":$((8000 + i))}" \
      || die "registering svc$i-$j in consul"
  done
done
for _ in $(seq 50); do
  [ "$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$p_cdns" "svc$last_svc.service.consul" SRV | wc -l)" = "$consul_instances" ] && break
  sleep 0.2
done
[ "$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$p_cdns" "svc$last_svc.service.consul" SRV | wc -l)" = "$consul_instances" ] \
  || die "consul does not answer svc$last_svc.service.consul SRV with $consul_instances instances"

# --- upstream resolver: unbound with a static bench. zone -------------------------
{
  cat <<EOF
server:
  interface: 127.0.0.1
  port: $p_up
  do-ip6: no
  do-daemonize: no
  chroot: ""
  username: ""
  pidfile: ""
  directory: "$tmp"
  use-syslog: no
  logfile: "$tmp/upstream-unbound.log"
  verbosity: 0
  num-threads: 1
  module-config: "iterator"
  access-control: 127.0.0.0/8 allow
  local-zone: "bench." static
  local-data: "bench. 3600 IN SOA ns.bench. hostmaster.bench. 1 3600 600 86400 3600"
EOF
  for i in $(seq 0 999); do
    echo "  local-data: \"h$i.bench. 3600 IN A 10.1.$((i / 256)).$((i % 256))\""
  done
  # TTL 0: never cached, every question of the forward mix goes upstream.
  echo '  local-zone: "fwd.bench." redirect'
  echo '  local-data: "fwd.bench. 0 IN A 10.3.0.1"'
} >"$tmp/upstream.conf"
unbound-checkconf "$tmp/upstream.conf" >/dev/null || die "upstream unbound config is invalid"
start upstream unbound -d -c "$tmp/upstream.conf"

# --- the three servers under test --------------------------------------------------
cat >"$tmp/wayfinder.toml" <<EOF
[consul]
http = "127.0.0.1:$p_http"
dns = ["127.0.0.1:$p_cdns"]

[dns]
listen = ["127.0.0.1:$p_wf"]
upstreams = ["127.0.0.1:$p_up"]
wildcard_domain = ".apps.bench.test"
wildcard_targets = ["10.0.0.5"]
zones_dir = "$tmp/nozones"
EOF
start wayfinder env RUST_LOG=warn "$wayfinder" dns -c "$tmp/wayfinder.toml"

# dnsmasq 2.90 with the flags PanteraS used (defaults otherwise, e.g. dns-forward-max 150).
start dnsmasq dnsmasq -d -k --conf-file=/dev/null --pid-file= --port="$p_dm" \
  --listen-address=127.0.0.1 --bind-interfaces --no-resolv \
  --server="127.0.0.1#$p_up" --server="/consul/127.0.0.1#$p_cdns" \
  --address=/apps.bench.test/10.0.0.5 --cache-size=10000 --user=root

cat >"$tmp/unbound.conf" <<EOF
server:
  interface: 127.0.0.1
  port: $p_ub
  do-ip6: no
  do-daemonize: no
  chroot: ""
  username: ""
  pidfile: ""
  directory: "$tmp"
  use-syslog: no
  logfile: "$tmp/unbound-peer.log"
  verbosity: 0
  num-threads: 2
  so-reuseport: yes
  so-rcvbuf: 4m
  so-sndbuf: 4m
  msg-cache-size: 64m
  rrset-cache-size: 128m
  msg-cache-slabs: 2
  rrset-cache-slabs: 2
  infra-cache-slabs: 2
  key-cache-slabs: 2
  num-queries-per-thread: 4096
  module-config: "iterator"
  qname-minimisation: no
  prefetch: no
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  local-zone: "consul." nodefault
  domain-insecure: "consul"
  local-zone: "apps.bench.test." redirect
  local-data: "apps.bench.test. 0 IN A 10.0.0.5"

forward-zone:
  name: "consul."
  forward-addr: 127.0.0.1@$p_cdns
  forward-no-cache: yes

forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$p_up
  forward-first: no
EOF
unbound-checkconf "$tmp/unbound.conf" >/dev/null || die "unbound config is invalid"
start unbound unbound -d -c "$tmp/unbound.conf"

read -r -a servers <<<"${SERVERS:-wayfinder dnsmasq unbound}"
declare -A port=([wayfinder]=$p_wf [dnsmasq]=$p_dm [unbound]=$p_ub)

# --- query mixes -------------------------------------------------------------------
read -r -a mixes <<<"${MIXES:-wildcard cached consul forward}"
for i in $(seq 0 999); do echo "x$i.apps.bench.test A"; done >"$tmp/wildcard.txt"
for i in $(seq 0 999); do echo "h$i.bench. A"; done >"$tmp/cached.txt"
for i in $(seq 0 999); do echo "f$i.fwd.bench. A"; done >"$tmp/forward.txt"
for i in $(seq 0 "$last_svc"); do
  if [ $((i % 2)) = 0 ]; then
    printf 'svc%d.service.consul SRV\nsvc%d.service.consul A\n' "$i" "$i"
  else
    printf 'svc%d.service.consul A\nsvc%d.service.consul SRV\n' "$i" "$i"
  fi
done >"$tmp/consul.txt"

# --- every server answers one name of each mix -------------------------------------
expect_answer() { # server name type what-to-expect(regex)
  local server=$1 name=$2 type=$3 want=$4 got=""
  for _ in $(seq 50); do
    check_alive
    got=$(dig +short +time=1 +tries=1 @127.0.0.1 -p "${port[$server]}" "$name" "$type" 2>/dev/null || true)
    grep -Eq "$want" <<<"$got" && return 0
    sleep 0.2
  done
  die "$server (port ${port[$server]}) does not answer $name $type with /$want/ (got: ${got:-nothing})"
}
for s in "${servers[@]}"; do
  expect_answer "$s" x7.apps.bench.test A '^10\.0\.0\.5$'
  expect_answer "$s" h7.bench. A '^10\.1\.0\.7$'
  expect_answer "$s" svc7.service.consul SRV "^1 1 8007 "
  expect_answer "$s" svc7.service.consul A '^10\.2\.7\.[0-9]+$'
  expect_answer "$s" f7.fwd.bench. A '^10\.3\.0\.1$'
  echo "verified: $s answers wildcard, cached-upstream and consul names"
done

# --- measurement -------------------------------------------------------------------
pin=()
[ -n "$dnsperf_cpu" ] && pin=(taskset -c "$dnsperf_cpu")
dnsperf_common=(-s 127.0.0.1 -T 1 -t 2 -O suppress=timeouts,congestion,sendfailed,sockready,unexpected)

# Warm every cache once: each name of each mix, a few in flight.
for s in "${servers[@]}"; do
  for m in "${mixes[@]}"; do
    timeout 60 "${pin[@]}" dnsperf "${dnsperf_common[@]}" -p "${port[$s]}" -d "$tmp/$m.txt" -n 1 -c 4 -q 20 -l 30 \
      >"$tmp/warm-$s-$m.out" 2>&1 || die "dnsperf warm-up of $s ($m) failed"
  done
done
check_alive

results="$tmp/results.tsv"
printf 'round\tmix\tserver\tqps\tavg_ms\tstddev_ms\tsent\tlost\tnoerror_pct\tp50_ms\tp99_ms\tserver_cpu_pct\tdnsperf_cpu_pct\n' >"$results"
clk_tck=$(getconf CLK_TCK)
# CPU ticks (user + system, all threads) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

field() { # file label -> first number after "label:"
  awk -v l="$1:" '(i = index($0, l)) { $0 = substr($0, i + length(l)); print $1; exit }' "$2"
}

measure() { # round mix server
  local r=$1 m=$2 s=$3 out="$tmp/run-$1-$2-$3.out" lat="$tmp/lat-$1-$2-$3.out" times="$tmp/time-$1-$2-$3.out"
  local pid=${pid_of[$s]} before after attempt
  for attempt in 1 2 3; do
    before=$(cpu_ticks "$pid")
    # bash's `time` reports the CPU dnsperf used (user, system, wall).
    if { TIMEFORMAT='%U %S %R'; time timeout $((run_seconds + 30)) "${pin[@]}" dnsperf "${dnsperf_common[@]}" \
      -p "${port[$s]}" -d "$tmp/$m.txt" -l "$run_seconds" -c "$clients" -q "$outstanding" >"$out" 2>&1; } 2>"$times"; then
      break
    fi
    # dnsperf 2.10 can hang at the end of a run (a query left outstanding
    # with no send time, see benches/README.md): the timeout ends it; run again.
    [ "$attempt" -lt 3 ] || die "dnsperf against $s ($m) failed: $(tail -3 "$out")"
    echo "  (round $r $m $s: dnsperf did not finish, run again)"
    check_alive
  done
  after=$(cpu_ticks "$pid")
  local srv_cpu gen_cpu
  read -r srv_cpu gen_cpu < <(awk -v b="$before" -v a="$after" -v hz="$clk_tck" '
    { printf "%.0f %.0f\n", (a - b) / hz / $3 * 100, ($1 + $2) / $3 * 100 }' "$times")
  local qps avg sd sent lost noerr p50=NA p99=NA
  qps=$(field "Queries per second" "$out")
  avg=$(field "Average Latency (s)" "$out")
  sd=$(field "Latency StdDev (s)" "$out")
  sent=$(field "Queries sent" "$out")
  lost=$(field "Queries lost" "$out")
  noerr=$(grep -o 'NOERROR [0-9]* ([0-9.]*%)' "$out" | head -1 | tr -dc '0-9. ' | awk '{print $2}' || true)
  [ -n "$qps" ] && [ -n "$lost" ] || die "could not parse dnsperf output $out"
  if [ "$lat_seconds" != 0 ]; then
    local rate=$lat_qps
    [ "$m" = consul ] || [ "$m" = forward ] && rate=$consul_lat_qps
    timeout $((lat_seconds + 30)) "${pin[@]}" dnsperf "${dnsperf_common[@]}" -p "${port[$s]}" -d "$tmp/$m.txt" \
      -l "$lat_seconds" -c "$clients" -q "$outstanding" -Q "$rate" -v >"$lat" 2>&1 \
      || die "latency run against $s ($m) failed"
    read -r p50 p99 < <(awk '/^> / { print $NF }' "$lat" | sort -g | awk '
      { v[NR] = $1 }
      END {
        if (NR == 0) { print "NA NA"; exit }
        i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
        printf "%.3f %.3f\n", v[i50] * 1000, v[i99] * 1000
      }')
    rm -f "$lat"
  fi
  check_alive
  printf '%s\t%s\t%s\t%s\t%.3f\t%.3f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$m" "$s" "$qps" \
    "$(awk -v x="$avg" 'BEGIN { print x * 1000 }')" "$(awk -v x="$sd" 'BEGIN { print x * 1000 }')" \
    "$sent" "$lost" "${noerr:-0}" "$p50" "$p99" "$srv_cpu" "$gen_cpu" >>"$results"
  printf '  round %d %-8s %-9s %7.0f qps  server cpu %3s%%  dnsperf cpu %3s%%  lost %-5s noerror %6s%%  p50 %s ms  p99 %s ms  (%s)\n' \
    "$r" "$m" "$s" "$qps" "$srv_cpu" "$gen_cpu" "$lost" "${noerr:-0}" "$p50" "$p99" \
    "$(grep -o 'Response codes:.*' "$out" | head -1)"
}

echo "measuring: $rounds rounds x ${#mixes[@]} mixes x ${#servers[@]} servers x (${run_seconds}s + ${lat_seconds}s latency at ${lat_qps} qps, consul ${consul_lat_qps} qps)"
for r in $(seq 1 "$rounds"); do
  for m in "${mixes[@]}"; do
    for ((k = 0; k < ${#servers[@]}; k++)); do
      measure "$r" "$m" "${servers[$(((r - 1 + k) % ${#servers[@]}))]}"
    done
  done
done

# --- summary -------------------------------------------------------------------------
python3 - "$results" "$lat_qps" "$consul_lat_qps" <<'EOF'
import csv, statistics, sys
from benchstats import fmt, med, num
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
lat_qps, consul_lat_qps = sys.argv[2], sys.argv[3]
mixes = [m for m in ["wildcard", "cached", "consul", "forward"] if any(r["mix"] == m for r in rows)]
servers = [s for s in ["wayfinder", "dnsmasq", "unbound"] if any(r["server"] == s for r in rows)]
# Targets: wayfinder QPS / peer QPS at least this (None: no target).
targets = {"wildcard": {"dnsmasq": 2.0, "unbound": 1.2},
           "cached": {"dnsmasq": 2.0, "unbound": 1.2},
           "consul": {"dnsmasq": 0.95, "unbound": None},
           "forward": {"dnsmasq": None, "unbound": None}}


def per_core(row):
    # QPS per fully used server core: the server's capacity per core, estimated
    # from a run that may not have saturated it.
    q, c = num(row["qps"]), num(row["server_cpu_pct"])
    return q / (c / 100) if q is not None and c else None

for r in rows:
    r["qps_per_core"] = per_core(r)
    # Answers that answered: dnsmasq refuses what is over its dns-forward-max
    # (150 in flight) with SERVFAIL/REFUSED, which dnsperf counts as answers.
    q, ok = num(r["qps"]), num(r["noerror_pct"])
    r["good_qps"] = q * ok / 100 if q is not None and ok is not None else None



by = {(r["mix"], r["server"], r["round"]): r for r in rows}
rounds = sorted({r["round"] for r in rows}, key=int)

def col(m, s, k):
    return med([num(by[(m, s, r)][k]) for r in rounds if (m, s, r) in by])

def ratio(m, peer, k):
    vals = []
    for r in rounds:
        a, b = by.get((m, "wayfinder", r)), by.get((m, peer, r))
        if a and b and num(a[k]) is not None and num(b[k]):
            vals.append(num(a[k]) / num(b[k]))
    return med(vals)

print()
print("medians over rounds; 'srv cpu' = CPU the server used during the throughput run (100 = one core);")
print("'QPS/core' = QPS / srv cpu; 'gen cpu' = dnsperf's CPU; p50/p99 from separate runs at",
      f"{lat_qps} QPS ({consul_lat_qps} for consul)")
print(f"{'mix':<9} {'server':<10} {'QPS':>8} {'srv cpu':>7} {'QPS/core':>9} {'gen cpu':>7} {'avg ms':>7} {'sd ms':>6} "
      f"{'p50 ms':>7} {'p99 ms':>7} {'lost':>6} {'NOERROR%':>8}")
for m in mixes:
    for s in servers:
        print(f"{m:<9} {s:<10} {fmt(col(m, s, 'qps'), '8.0f')} {fmt(col(m, s, 'server_cpu_pct'), '6.0f')}% "
              f"{fmt(col(m, s, 'qps_per_core'), '9.0f')} {fmt(col(m, s, 'dnsperf_cpu_pct'), '6.0f')}% "
              f"{fmt(col(m, s, 'avg_ms'), '7.3f')} {fmt(col(m, s, 'stddev_ms'), '6.3f')} "
              f"{fmt(col(m, s, 'p50_ms'), '7.3f')} {fmt(col(m, s, 'p99_ms'), '7.3f')} "
              f"{fmt(col(m, s, 'lost'), '6.0f')} {fmt(col(m, s, 'noerror_pct'), '8.2f')}")
print()
print("wayfinder / peer, median of per-round ratios (QPS and QPS/core: higher is better; p99: lower is better)")
for m in mixes:
    for peer in [p for p in ["dnsmasq", "unbound"] if p in servers]:
        q, c, p = ratio(m, peer, "qps"), ratio(m, peer, "qps_per_core"), ratio(m, peer, "p99_ms")
        g = ratio(m, peer, "good_qps")
        goal = targets[m][peer]
        verdict = []
        if goal is not None:
            verdict.append(f"QPS >= {goal}x: {'met' if q is not None and q >= goal else 'MISSED'}")
            if m != "consul":
                verdict.append(f"QPS/core >= {goal}x: {'met' if c is not None and c >= goal else 'MISSED'}")
        verdict.append(f"p99 <= 1x: {'met' if p is not None and p <= 1.0 else 'MISSED'}")
        print(f"{m:<9} vs {peer:<8} QPS {fmt(q, '5.2f')}  NOERROR QPS {fmt(g, '5.2f')}  QPS/core {fmt(c, '5.2f')}  p99 {fmt(p, '5.2f')}   "
              + "; ".join(verdict))
gen = med([num(r["dnsperf_cpu_pct"]) for r in rows if r["mix"] != "consul"])
if gen is not None and gen >= 90:
    print()
    print(f"note: dnsperf used {gen:.0f}% of its core in the median wildcard/cached run: the load generator,")
    print("      not the servers, set the QPS there, so QPS ratios sit near 1 whatever the servers' capacity;")
    print("      QPS/core (server CPU per answered query) is the capacity comparison on this machine.")
EOF
echo
echo "dns-compare: done in ${SECONDS}s"
