#!/usr/bin/env bash
# Side-by-side HTTP load-balancer benchmark: Wayfinder's lb vs HAProxy 2.6 (what
# PanteraS ran, one thread) vs an nginx reverse proxy (one worker), all on
# 127.0.0.1, all in front of the same two nginx backends registered in one Consul
# dev agent as service `web` (tag `haproxy`, weights 100/100). See benches/README.md
# for how to read the output.
#
#   benches/lb-compare.sh                   # ROUNDS=3 SECONDS=5
#   ROUNDS=1 SECONDS=3 benches/lb-compare.sh
#
# Environment (all optional):
#   ROUNDS        rounds; every round measures every proxy once              (3)
#   SECONDS       length of one wrk run, seconds                             (5)
#   CONNECTIONS   wrk -c: client connections, all keep-alive                 (64)
#   WRK_CPU       CPU list wrk is pinned to with taskset; empty = none       (last CPU)
#   WF_WORKERS    Wayfinder's `[lb] workers` (proxy threads); empty = its default (one per CPU)
#   KEEP_TMP=1    keep the temp dir (configs, logs, raw wrk output)
#
# Method (shared/notes/environment.md): absolute numbers on a 2-core shared machine
# swing by +-40%, so the three proxies are measured in alternating order within
# every round (the starting proxy rotates per round), each with identical wrk
# settings, and the summary reports medians and the median of the per-round ratios.
#
# Load generator: `wrk -t1 -c64 --latency`: one thread, 64 keep-alive connections,
# pinned with taskset to one core so it never takes more than that core from the
# proxy under test. Every request carries `Host: web.service`.
#
# CPU: for every run the script records the CPU (utime + stime, all threads, plus
# the cutime + cstime of reaped children) of every process of the proxy instance
# under test (Wayfinder: one process; HAProxy: one process; nginx: master + worker),
# read from /proc/PID/stat right before and right after wrk; also wrk's own CPU
# (bash `time`) and the two backends' CPU. "req/cpu-s" = requests answered per
# CPU-second of the proxy: the proxy's cost per request, comparable even when the
# load generator (one core) sets the pace.
#
# Exit status: 0 when every measurement ran (targets met or not: this is a
# measurement, not a test); non-zero when a component fails to start or to answer.
set -euo pipefail

# SECONDS is bash's elapsed-time counter: an inherited value is its start, so read
# it before anything else (0 means "not given").
run_seconds=$SECONDS
[ "$run_seconds" -gt 0 ] 2>/dev/null || run_seconds=5
SECONDS=0
rounds=${ROUNDS:-3}
connections=${CONNECTIONS:-64}
ncpu=$(nproc)
wrk_cpu=${WRK_CPU-$((ncpu - 1))}

BENCH_NAME='lb-compare'
BENCH_STOP_ORDER=reverse
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== lb-compare: Wayfinder vs HAProxy vs nginx (HTTP/1.1 keep-alive, Host: web.service)"
echo "command:  ROUNDS=$rounds SECONDS=$run_seconds CONNECTIONS=$connections WRK_CPU=${wrk_cpu:-none} $0 $*"
print_machine

# --- packages: wrk, HAProxy 2.6, nginx (and Consul, curl via install-deps) --------
apt_install_missing wrk haproxy nginx-light
command -v consul >/dev/null 2>&1 || scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
echo "versions: $("$haproxy_bin" -v | head -1 | awk '{print "HAProxy", $3}'), $("$nginx_bin" -v 2>&1 | awk -F/ '{print "nginx", $2}'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk", $2}'), $(consul version | head -1)"

build_wayfinder "$repo"

setup_tmp
chmod 755 "$tmp" # nginx workers run as nobody

# --- ports: free on 127.0.0.1 (TCP and UDP: Consul's serf and DNS use both) -------
read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_b1 p_b2 p_wf p_hap p_ngx < <(free_ports 11)
echo "ports:    consul http=$p_http, backends=$p_b1,$p_b2, wayfinder=$p_wf, haproxy=$p_hap, nginx=$p_ngx"

# --- two nginx backends: one master + one worker each ------------------------------
start_backends "$nginx_bin" "$p_b1" "$p_b2"

# --- Consul dev agent, service web = the two backends ------------------------------
start_consul "$p_http" "$p_cdns" "$p_grpc" "$p_serf_lan" "$p_serf_wan" "$p_server" \
  'disable_update_check = true'
for b in b1 b2; do
  port_var=p_$b
  curl -sf --max-time 5 -X PUT "http://127.0.0.1:$p_http/v1/agent/service/register" \
    -d "{\"ID\":\"web-$b\",\"Name\":\"web\",\"Address\":\"127.0.0.1\",\"Port\":${!port_var},\"Tags\":[\"haproxy\",\"haproxy_weight=100\"]}" \
    || die "registering web-$b in consul"
done
# PanteraS's per-service connection cap (Wayfinder's default is the same 128).
curl -sf --max-time 5 -X PUT "http://127.0.0.1:$p_http/v1/kv/haproxy/web/maxconn" -d 128 >/dev/null \
  || die "writing haproxy/web/maxconn to consul"

# --- the three proxies under test ----------------------------------------------------
# Each forwards Host unchanged and adds X-Forwarded-For, X-Forwarded-Proto and
# X-Unique-ID, as Wayfinder does (and PanteraS's HAProxy did), so all three do the
# same work per request.
write_lb_config "$p_http" "$p_cdns" "$p_wf"
[ -n "${WF_WORKERS:-}" ] && echo "workers = $WF_WORKERS" >>"$tmp/wayfinder.toml"
start wayfinder env RUST_LOG=warn "$wayfinder" lb -c "$tmp/wayfinder.toml"

write_haproxy_config "$haproxy_bin" "$p_hap" "$p_b1" "$p_b2"
start haproxy "$haproxy_bin" -db -f "$tmp/haproxy.cfg"

write_nginx_proxy_config "$nginx_bin" "$p_ngx" "$p_b1" "$p_b2"
start nginx "$nginx_bin" -p "$tmp/proxy/" -c "$tmp/proxy/nginx.conf"

proxies=(wayfinder haproxy nginx)
declare -A port=([wayfinder]=$p_wf [haproxy]=$p_hap [nginx]=$p_ngx)

# --- every proxy answers `ok` from both backends -------------------------------------
# Each backend adds `X-Backend: b1|b2`; a proxy is ready when 8 fresh requests all
# answer 200 "ok" and both backends were seen (Wayfinder: once its Consul watch has
# delivered both instances).
for p in "${proxies[@]}"; do
  expect_both "$p" "${port[$p]}"
done
# An unknown Host must not reach the backends through any proxy.
for p in "${proxies[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H 'Host: nothing.service' "http://127.0.0.1:${port[$p]}/" || true)
  [ "$code" = 503 ] || die "$p answers Host: nothing.service with $code, expected 503"
done

# --- measurement ---------------------------------------------------------------------
pin=()
[ -n "$wrk_cpu" ] && pin=(taskset -c "$wrk_cpu")
wrk_args=(-t1 -c"$connections" -H 'Host: web.service' --latency)
clk_tck=$(getconf CLK_TCK)

# Warm-up: fill every proxy's backend pool, let the backends settle.
for p in "${proxies[@]}"; do
  timeout 30 "${pin[@]}" wrk "${wrk_args[@]}" -d1s "http://127.0.0.1:${port[$p]}/" >"$tmp/warm-$p.out" 2>&1 \
    || die "wrk warm-up against $p failed: $(tail -3 "$tmp/warm-$p.out")"
done
check_alive
for p in "${proxies[@]}"; do
  echo "cpu of $p: pids $(tree_pids "${pid_of[$p]}" | sort -n | tr '\n' ' ')"
done

results="$tmp/results.tsv"
printf 'round\tproxy\treqs\tp50_ms\tp99_ms\tproxy_cpu_s\tproxy_cpu_pct\treq_per_cpu_s\twrk_cpu_pct\tbackend_cpu_pct\terrors\tnon2xx\n' >"$results"

measure() { # round proxy
  local r=$1 p=$2 out="$tmp/run-$1-$2.out" times="$tmp/time-$1-$2.out"
  local ppids bpids before after bbefore bafter
  mapfile -t ppids < <(tree_pids "${pid_of[$p]}")
  mapfile -t bpids < <(tree_pids "${pid_of[backend-b1]}"; tree_pids "${pid_of[backend-b2]}")
  before=$(cpu_ticks "${ppids[@]}")
  bbefore=$(cpu_ticks "${bpids[@]}")
  # bash's `time` reports the CPU wrk used (user, system, wall).
  { TIMEFORMAT='%U %S %R'; time timeout $((run_seconds + 30)) "${pin[@]}" wrk "${wrk_args[@]}" -d"${run_seconds}s" \
      "http://127.0.0.1:${port[$p]}/" >"$out" 2>&1; } 2>"$times" \
    || die "wrk against $p failed: $(tail -3 "$out")"
  after=$(cpu_ticks "${ppids[@]}")
  bafter=$(cpu_ticks "${bpids[@]}")
  check_alive
  python3 - "$r" "$p" "$out" "$times" "$before" "$after" "$bbefore" "$bafter" "$clk_tck" >>"$results" <<'EOF'
import re, sys
from benchstats import wrk_ms
r, p, out, times, before, after, bbefore, bafter, hz = sys.argv[1:]
text = open(out).read()
user, sys_, wall = (float(x) for x in open(times).read().split())
def ms(value):
    return wrk_ms(value, out)
dist = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", text, re.M))
rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
total = re.search(r"^\s+(\d+) requests in ([0-9.]+)(\w+),", text, re.M)
if not rps or not total or "50" not in dist or "99" not in dist:
    raise SystemExit(f"lb-compare: cannot parse wrk output {out}")
errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
nerr = sum(int(x) for x in errors.groups()) if errors else 0
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
n = int(total.group(1))
cpu_s = (int(after) - int(before)) / int(hz)
bcpu_s = (int(bafter) - int(bbefore)) / int(hz)
print("\t".join(str(x) for x in [
    r, p, rps.group(1), f"{ms(dist['50']):.3f}", f"{ms(dist['99']):.3f}", f"{cpu_s:.2f}",
    f"{cpu_s / wall * 100:.0f}", f"{n / cpu_s:.0f}" if cpu_s > 0 else "NA",
    f"{(user + sys_) / wall * 100:.0f}", f"{bcpu_s / wall * 100:.0f}", nerr,
    non2xx.group(1) if non2xx else 0]))
EOF
  tail -n 1 "$results" | awk -F'\t' '{
    printf "  round %d %-9s %8.0f req/s  p50 %7.3f ms  p99 %7.3f ms  proxy cpu %5.2f s (%3d%%)  %7s req/cpu-s  wrk cpu %3d%%  backends cpu %3d%%  errors %s non-2xx %s\n",
      $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 }'
}

echo "measuring: $rounds rounds x ${#proxies[@]} proxies x ${run_seconds}s: wrk ${wrk_args[*]} (pinned: ${wrk_cpu:-no})"
for r in $(seq 1 "$rounds"); do
  for k in 0 1 2; do
    measure "$r" "${proxies[$(((r - 1 + k) % 3))]}"
  done
done

# --- summary -------------------------------------------------------------------------
python3 - "$results" <<'EOF'
import csv, statistics, sys
from benchstats import fmt, med, num
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
proxies = ["wayfinder", "haproxy", "nginx"]
peers = ["haproxy", "nginx"]




by = {(r["proxy"], r["round"]): r for r in rows}
rounds = sorted({r["round"] for r in rows}, key=int)

def col(p, k):
    return med([num(by[(p, r)][k]) for r in rounds if (p, r) in by])

def ratios(k, peer_of_round):
    # wayfinder / peer per round; peer_of_round(round) gives the peer's value.
    vals = []
    for r in rounds:
        a, b = by.get(("wayfinder", r)), peer_of_round(r)
        if a and b and num(a[k]) is not None:
            vals.append(num(a[k]) / b)
    return med(vals)

def peer_value(peer, k):
    return lambda r: num(by[(peer, r)][k]) if (peer, r) in by and num(by[(peer, r)][k]) else None

def best_value(k, pick):
    def f(r):
        vals = [num(by[(p, r)][k]) for p in peers if (p, r) in by and num(by[(p, r)][k])]
        return pick(vals) if vals else None
    return f

print()
print("medians over rounds; 'cpu s' = CPU-seconds the proxy's processes used during the run (100% = one core);")
print("'req/cpu-s' = requests / proxy CPU-seconds; 'wrk cpu' = the load generator's CPU; 'backends' = both nginx backends")
print(f"{'proxy':<10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cpu s':>6} {'cpu':>5} {'req/cpu-s':>9} {'wrk cpu':>7} {'backends':>8} {'errors':>6} {'non-2xx':>7}")
for p in proxies:
    print(f"{p:<10} {fmt(col(p, 'reqs'), '8.0f')} {fmt(col(p, 'p50_ms'), '7.3f')} {fmt(col(p, 'p99_ms'), '7.3f')} "
          f"{fmt(col(p, 'proxy_cpu_s'), '6.2f')} {fmt(col(p, 'proxy_cpu_pct'), '4.0f')}% {fmt(col(p, 'req_per_cpu_s'), '9.0f')} "
          f"{fmt(col(p, 'wrk_cpu_pct'), '6.0f')}% {fmt(col(p, 'backend_cpu_pct'), '7.0f')}% "
          f"{fmt(col(p, 'errors'), '6.0f')} {fmt(col(p, 'non2xx'), '7.0f')}")
print()
print("wayfinder / peer, median of per-round ratios (req/s and req/cpu-s: higher is better; p99: lower is better)")
for peer in peers:
    q = ratios("reqs", peer_value(peer, "reqs"))
    c = ratios("req_per_cpu_s", peer_value(peer, "req_per_cpu_s"))
    p = ratios("p99_ms", peer_value(peer, "p99_ms"))
    print(f"  vs {peer:<8} req/s {fmt(q, '5.2f')}  req/cpu-s {fmt(c, '5.2f')}  p99 {fmt(p, '5.2f')}")
c = ratios("req_per_cpu_s", best_value("req_per_cpu_s", max))
p = ratios("p99_ms", best_value("p99_ms", min))
print(f"  vs best   req/cpu-s {fmt(c, '5.2f')} (per round, the higher of haproxy and nginx)  "
      f"p99 {fmt(p, '5.2f')} (per round, the lower of the two)")
print()
print("target: req/cpu-s >= 1.0x the better of HAProxy and nginx: "
      + ("met" if c is not None and c >= 1.0 else "MISSED")
      + f"; p99 <= 1.2x theirs: " + ("met" if p is not None and p <= 1.2 else "MISSED"))
bad = [r for r in rows if num(r["errors"]) or num(r["non2xx"])]
if bad:
    print(f"note: {len(bad)} run(s) had socket errors or non-2xx answers (see the per-run lines above)")
gen = med([num(r["wrk_cpu_pct"]) for r in rows])
if gen is not None and gen >= 90:
    print(f"note: wrk used {gen:.0f}% of its core in the median run: the load generator may set the pace, so")
    print("      req/s ratios sit near 1 whatever the proxies' capacity; req/cpu-s is the capacity comparison.")
EOF
echo
echo "lb-compare: done in ${SECONDS}s"
