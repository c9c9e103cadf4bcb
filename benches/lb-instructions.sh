#!/usr/bin/env bash
# User-space instructions per proxied request: Wayfinder's lb vs HAProxy 2.6, each
# run under valgrind's callgrind in front of the same two nginx backends. Unlike
# lb-compare.sh this figure does not move with the other load on the machine
# (callgrind counts instructions, not time), so it shows whether a change made
# the per-request path cheaper even on 2 noisy cores. It says nothing about
# kernel time (the syscalls per request are the same for both: see README.md).
#
#   benches/lb-instructions.sh               # SECONDS=10, about 1 minute after the build
#   WAYFINDER=/work/baseline/wayfinder benches/lb-instructions.sh   # a given binary
#
# It builds `cargo build --profile profiling` (target/profiling/wayfinder: the
# release code with symbols and line tables, so callgrind_annotate can name the
# functions; the release binary is stripped). The instruction counts are the same
# as a release binary's: only the symbols differ.
#
# Environment (all optional):
#   SECONDS       length of the measured wrk run under callgrind, seconds     (10)
#   WAYFINDER     a wayfinder binary to measure instead of building this tree
#                 (e.g. an older build, for a before/after figure)
#   CACHE_SIM=1   also simulate the caches and branch predictor (callgrind
#                 --cache-sim=yes --branch-sim=yes; slower): L1 instruction and
#                 data misses, last-level misses and mispredicted branches per
#                 request, which say why fewer instructions can take longer
#   KEEP_TMP=1    keep the temp dir (configs, logs, callgrind output)
#
# Method: start the proxy under callgrind (Wayfinder with `[lb] workers = 1`,
# HAProxy with `nbthread 1`), warm up 3 s with wrk (16 connections), zero the
# counters (`callgrind_control -z`), run wrk for SECONDS, dump the counters
# (`callgrind_control -d`), and divide the instructions by the requests wrk
# completed. Exit status 0 whenever both measurements ran.
set -euo pipefail

run_seconds=$SECONDS
[ "$run_seconds" -gt 0 ] 2>/dev/null || run_seconds=10
SECONDS=0

BENCH_NAME='lb-instructions'
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== lb-instructions: user-space instructions per request, Wayfinder vs HAProxy (callgrind)"
echo "command:  SECONDS=$run_seconds $0 $*"
print_machine
apt_install_missing wrk haproxy nginx-light valgrind
command -v consul >/dev/null 2>&1 || scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
build_wayfinder "$repo" profiling
setup_tmp
chmod 755 "$tmp"

read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_b1 p_b2 p_wf p_hap < <(free_ports 10)
start_backends "$nginx_bin" "$p_b1" "$p_b2"
start_consul "$p_http" "$p_cdns" "$p_grpc" "$p_serf_lan" "$p_serf_wan" "$p_server" 'disable_update_check = true'
for b in b1 b2; do
  port_var=p_$b
  curl -sf --max-time 5 -X PUT "http://127.0.0.1:$p_http/v1/agent/service/register" \
    -d "{\"ID\":\"web-$b\",\"Name\":\"web\",\"Address\":\"127.0.0.1\",\"Port\":${!port_var},\"Tags\":[\"haproxy\"]}" \
    || die "registering web-$b in consul"
done

write_lb_config "$p_http" "$p_cdns" "$p_wf"
printf 'register = ""\nworkers = 1\n' >>"$tmp/wayfinder.toml"
write_haproxy_config "$haproxy_bin" "$p_hap" "$p_b1" "$p_b2"

sim_args=()
[ "${CACHE_SIM:-0}" = 1 ] && sim_args=(--cache-sim=yes --branch-sim=yes)

# measure NAME PORT CMD...: prints "NAME requests instructions per-request"
# (and with CACHE_SIM=1 writes the simulated misses to $tmp/NAME.sim).
measure() {
  local name=$1 port=$2
  shift 2
  start "$name" env RUST_LOG=warn valgrind --tool=callgrind "${sim_args[@]}" --callgrind-out-file="$tmp/$name.cg" "$@"
  local ok=""
  for _ in $(seq 150); do
    check_alive
    ok=$(curl -s --max-time 2 -H 'Host: web.service' "http://127.0.0.1:$port/" || true)
    [ "$ok" = ok ] && break
    sleep 0.2
  done
  [ "$ok" = ok ] || die "$name does not answer through callgrind"
  wrk -t1 -c16 -d3s -H 'Host: web.service' "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -z "${pid_of[$name]}" >/dev/null 2>&1
  local requests
  requests=$(wrk -t1 -c16 -d"${run_seconds}s" -H 'Host: web.service' "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  callgrind_control -d "${pid_of[$name]}" >/dev/null 2>&1
  sleep 1
  local f total=0 ir
  for f in "$tmp/$name.cg".*; do
    ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    [ -n "$ir" ] && [ "$ir" -gt "$total" ] && total=$ir
  done
  [ "${requests:-0}" -gt 0 ] || die "$name: wrk completed no request"
  kill -TERM "${pid_of[$name]}" 2>/dev/null || true
  if [ "${CACHE_SIM:-0}" = 1 ]; then
    # The dump with the most instructions is the measured run; its `events:` and
    # `summary:` lines carry every simulated counter.
    python3 - "$requests" "$tmp/$name.cg".* >"$tmp/$name.sim" <<'EOF'
import sys
requests, files = int(sys.argv[1]), sys.argv[2:]
best = None
for f in files:
    events = summary = None
    for line in open(f, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            summary = [int(x) for x in line.split()[1:]]
    if events and summary and (best is None or summary[0] > best[1][0]):
        best = (events, summary)
if best:
    c = dict(zip(*best))
    per = lambda *names: sum(c.get(n, 0) for n in names) / requests
    print(f"{per('I1mr'):.0f} {per('D1mr', 'D1mw'):.0f} {per('ILmr', 'DLmr', 'DLmw'):.0f} {per('Bcm', 'Bim'):.0f}")
EOF
  fi
  echo "$name $requests $total $((total / requests))"
}

echo "measuring: wrk -t1 -c16 -d${run_seconds}s under callgrind, one proxy at a time"
wf=$(measure wayfinder "$p_wf" "$wayfinder" lb -c "$tmp/wayfinder.toml")
hap=$(measure haproxy "$p_hap" "$haproxy_bin" -db -f "$tmp/haproxy.cfg")
printf '%-10s %10s %16s %14s\n' proxy requests instructions 'instr/request'
for line in "$wf" "$hap"; do
  # shellcheck disable=SC2086 # the fields are numbers and a name
  printf '%-10s %10s %16s %14s\n' $line
done
awk -v a="${wf##* }" -v b="${hap##* }" 'BEGIN { printf "wayfinder / haproxy instructions per request: %.2f (below 1: Wayfinder is cheaper)\n", a / b }'
if [ "${CACHE_SIM:-0}" = 1 ]; then
  echo "simulated per request (callgrind --cache-sim=yes --branch-sim=yes):"
  printf '%-10s %10s %10s %10s %12s\n' proxy 'I1 misses' 'D1 misses' 'LL misses' 'mispredicts'
  for name in wayfinder haproxy; do
    # shellcheck disable=SC2046 # four numbers
    printf '%-10s %10s %10s %10s %12s\n' "$name" $(cat "$tmp/$name.sim")
  done
fi
echo "$BENCH_NAME: done in ${SECONDS}s"
