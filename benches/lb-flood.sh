#!/usr/bin/env bash
# Does a flood of idle connections hurt a normal client? Wayfinder's lb and
# dns (one `wayfinder lb` and one `wayfinder dns`, a Consul dev agent, two
# nginx backends) are measured from a normal client on 127.0.0.1 (wrk through
# the lb, sequential DNS queries over UDP and over fresh TCP connections)
# before and while a flood client on other loopback addresses holds idle
# connections:
#
#   baseline   no flood
#   one-source FLOOD_LB idle lb connections and FLOOD_DNS idle dns-over-TCP
#              connections, all from 127.0.0.2: the lb keeps
#              max_connections_per_source (1000) of them and closes the rest
#   spread     FLOOD_LB idle lb connections spread over SPREAD sources
#              (127.0.0.2..), 1000 each, all held under max_connections;
#              FLOOD_DNS dns-over-TCP connections from 127.0.0.2
#
#   benches/lb-flood.sh
#   FLOOD_LB=5000 RUN_SECONDS=5 benches/lb-flood.sh
#
# Environment (all optional):
#   FLOOD_LB       idle connections opened to the lb per flood phase      (20000)
#   FLOOD_DNS      idle dns-over-TCP connections per flood phase          (2000)
#   SPREAD         source addresses of the spread phase                   (20)
#   RUN_SECONDS    length of one wrk run                                  (5)
#   ROUNDS         wrk runs per phase, through the lb and direct each     (3)
#   CONNECTIONS    wrk -c of the normal client                            (8)
#   WAYFINDER      a wayfinder binary to use instead of building one
#   KEEP_TMP=1     keep the temp dir
#
# The lb runs with max_connections = FLOOD_LB + 5000, the default
# max_connections_per_source (1000), and handshake_timeout / idle_timeout /
# dns.tcp_idle_timeout raised to 300 s so that the idle flood is still held
# while it is measured (with the defaults it would be closed after 10 s).
# The script raises `ulimit -n` (the hard limit too, as root with
# CAP_SYS_RESOURCE) for itself and every process it starts. Where the limit
# cannot be raised that far, the lb's max_connections is what its limit
# allows (limit - 2048) and the spread phase holds that less 1000; the script
# says so. The flood client runs as several processes of at most 8000 sockets.
#
# Per phase it prints: flood connections held and closed by the server (lb,
# dns), the lb's own count of open client connections and refusals, the
# normal client's wrk req/s, p99 and errors (medians of ROUNDS runs), the
# same wrk run straight at a backend (the machine's noise, same rounds), its
# DNS p99 over UDP and over TCP with failures, and the p99 ratios to the
# baseline. Target: the normal client keeps being served (no errors) with its
# lb p99 within 2x.
#
# Exit status: 0 when the measurement ran (target met or not).
set -euo pipefail

flood_lb=${FLOOD_LB:-20000}
flood_dns=${FLOOD_DNS:-2000}
spread=${SPREAD:-20}
run_seconds=${RUN_SECONDS:-5}
rounds=${ROUNDS:-3}
connections=${CONNECTIONS:-8}

BENCH_NAME='lb-flood'
BENCH_STOP_ORDER=reverse
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== lb-flood: a normal client's latency while idle connections flood the lb and the dns"
echo "command:  FLOOD_LB=$flood_lb FLOOD_DNS=$flood_dns SPREAD=$spread RUN_SECONDS=$run_seconds ROUNDS=$rounds CONNECTIONS=$connections $0 $*"
print_machine
[ $((flood_lb / spread)) -le 1000 ] || { echo "lb-flood: FLOOD_LB / SPREAD must be at most 1000 (the per-source cap)" >&2; exit 64; }
[ "$spread" -le 200 ] || { echo "lb-flood: SPREAD must be at most 200" >&2; exit 64; }

# Every process started from here inherits this limit: the flood client holds
# FLOOD_LB + FLOOD_DNS sockets, the lb as many plus its backends.
# The lb holds the spread flood (FLOOD_LB), its backends and listeners.
want_fds=$((flood_lb + 8192))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_fds" ]; then
  if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want_fds" ]; then
    ulimit -Hn "$want_fds" 2>/dev/null || true
  fi
  hard=$(ulimit -Hn)
  if [ "$hard" != unlimited ] && [ "$hard" -lt "$want_fds" ]; then
    ulimit -n "$hard"
  else
    ulimit -n "$want_fds"
  fi
fi
fds=$(ulimit -n)
[ "$fds" = unlimited ] && fds=1048576
[ "$fds" -ge 12288 ] || { echo "lb-flood: needs an open-file limit of at least 12288 (ulimit -n is $fds)" >&2; exit 1; }
lb_max=$((flood_lb + 5000))
[ $lb_max -le $((fds - 2048)) ] || lb_max=$((fds - 2048))
spread_lb=$flood_lb
[ "$spread_lb" -le $((lb_max - 1000)) ] || spread_lb=$((lb_max - 1000))
echo "ulimit:   -n $fds (wanted $want_fds): lb max_connections $lb_max, spread phase $spread_lb connections"

apt_install_missing nginx-light wrk curl
command -v consul >/dev/null 2>&1 || scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
echo "versions: $("$nginx_bin" -v 2>&1 | awk -F/ '{print "nginx", $2}'), $(consul version | head -1), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
if [ -n "${WAYFINDER:-}" ]; then
  wayfinder=$WAYFINDER
else
  build_wayfinder "$repo"
fi
setup_tmp
chmod 755 "$tmp"

read -r c_http c_dns c_grpc c_lan c_wan c_server lb_port stats_port dns_port b1_port b2_port < <(free_ports 11)
start_consul "$c_http" "$c_dns" "$c_grpc" "$c_lan" "$c_wan" "$c_server"
start_backends "$nginx_bin" "$b1_port" "$b2_port"
for i in 1 2; do
  port_var="b${i}_port"
  curl -sf -X PUT "http://127.0.0.1:$c_http/v1/agent/service/register" \
    -d "{\"ID\":\"web-$i\",\"Name\":\"web\",\"Address\":\"127.0.0.1\",\"Port\":${!port_var},\"Tags\":[\"haproxy\"]}" \
    || die "cannot register web-$i in Consul"
done

mkdir -p "$tmp/nozones"
cat >"$tmp/wayfinder.toml" <<EOF
[consul]
http = "127.0.0.1:$c_http"
dns = ["127.0.0.1:$c_dns"]

[dns]
listen = ["127.0.0.1:$dns_port"]
upstreams = ["127.0.0.1:9"]
zones_dir = "$tmp/nozones"
wildcard_domain = ".apps.example.com"
wildcard_targets = ["127.0.0.1"]
tcp_idle_timeout = "300s"

[lb]
http = "127.0.0.1:$lb_port"
stats = "127.0.0.1:$stats_port"
register = ""
max_connections = $lb_max
handshake_timeout = "300s"
idle_timeout = "300s"
EOF
"$wayfinder" check -c "$tmp/wayfinder.toml" >"$tmp/wayfinder-check.log" 2>&1 \
  || die "wayfinder config is invalid: $(cat "$tmp/wayfinder-check.log")"
start lb "$wayfinder" lb -c "$tmp/wayfinder.toml"
start dns "$wayfinder" dns -c "$tmp/wayfinder.toml"

ok=0
for _ in $(seq 150); do
  check_alive
  if [ "$(curl -s --max-time 1 -H 'Host: web.service' "http://127.0.0.1:$lb_port/" || true)" = ok ]; then
    ok=1
    break
  fi
  sleep 0.2
done
[ $ok = 1 ] || die "the lb does not route web.service"

cat >"$tmp/flood.py" <<'EOF'
"""Opens idle TCP connections from given source addresses and holds them.

flood.py READY_FILE FINAL_FILE LB_PORT N_LB DNS_PORT N_DNS SOURCE...
The lb connections are spread evenly over the sources; the dns ones come from
the first. Once all are open (or failed) and 3 s have passed, it writes
"held_lb closed_lb failed_lb held_dns closed_dns failed_dns" to READY_FILE,
then holds them until SIGTERM, when it writes the same counts to FINAL_FILE
and closes everything with a reset (no TIME_WAIT left behind).
"""
import errno, select, signal, socket, struct, sys, time

ready_file, final_file = sys.argv[1], sys.argv[2]
lb_port, n_lb, dns_port, n_dns = (int(x) for x in sys.argv[3:7])
sources = sys.argv[7:]
IP_BIND_ADDRESS_NO_PORT = 24  # the port is chosen at connect, per destination

def open_batch(plan):
    """plan: [(source, port)] -> list of (socket or None)."""
    socks, ep = [], select.epoll()
    pending = {}
    for src, port in plan:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.setblocking(False)
        s.bind((src, 0))
        rc = s.connect_ex(("127.0.0.1", port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            socks.append(None)
            continue
        socks.append(s)
        pending[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLOUT)
    deadline = time.time() + 10
    while pending and time.time() < deadline:
        for fd, _ in ep.poll(0.5):
            ep.unregister(fd)
            pending.pop(fd, None)
    ep.close()
    out = []
    for s in socks:
        if s is None:
            out.append(None)
        elif s.fileno() in pending or s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
            s.close()
            out.append(None)
        else:
            out.append(s)
    return out

def open_all(port, n, srcs, batch=256):
    plan = [(srcs[i % len(srcs)], port) for i in range(n)]
    held = []
    for i in range(0, n, batch):
        held += open_batch(plan[i:i + batch])
    return held

def count(socks):
    held = closed = failed = 0
    for s in socks:
        if s is None:
            failed += 1
            continue
        try:
            data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if data == b"":
                closed += 1
            else:
                held += 1
        except BlockingIOError:
            held += 1
        except OSError:
            closed += 1
    return held, closed, failed

lb = open_all(lb_port, n_lb, sources)
dns = open_all(dns_port, n_dns, sources[:1])
time.sleep(3)
def report(path):
    with open(path, "w") as f:
        f.write(" ".join(str(x) for x in count(lb) + count(dns)) + "\n")
report(ready_file)
def stop(*_):
    report(final_file)
    for s in lb + dns:
        if s is not None:
            s.close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(3600)
EOF

cat >"$tmp/dnsclient.py" <<'EOF'
"""The normal DNS client: N sequential UDP queries and N/10 queries over fresh
TCP connections for a wildcard name the dns answers itself.
Prints: udp_p99_ms udp_failed tcp_p99_ms tcp_failed (p99 "NA" when none succeeded)."""
import random, socket, struct, sys, time

port, n = int(sys.argv[1]), int(sys.argv[2])
def query(qid):
    name = b"".join(bytes([len(l)]) + l for l in b"bench.apps.example.com".split(b".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
def p99(xs):
    if not xs:
        return "NA"
    xs.sort()
    return f"{xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000:.3f}"
udp, udp_failed = [], 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(n):
    qid = random.randrange(65536)
    t = time.perf_counter()
    try:
        s.sendto(query(qid), ("127.0.0.1", port))
        while True:
            data = s.recv(4096)
            if data[:2] == struct.pack(">H", qid):
                break
        udp.append(time.perf_counter() - t)
    except OSError:
        udp_failed += 1
tcp, tcp_failed = [], 0
for _ in range(max(1, n // 10)):
    qid = random.randrange(65536)
    q = query(qid)
    t = time.perf_counter()
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2.0)
        c.sendall(struct.pack(">H", len(q)) + q)
        head = c.recv(2)
        if len(head) < 2:
            raise OSError("closed")
        c.close()
        tcp.append(time.perf_counter() - t)
    except OSError:
        tcp_failed += 1
print(p99(udp), udp_failed, p99(tcp), tcp_failed)
EOF

# The lb's own view of its client connections, from /stats.json.
lb_conns() {
  curl -s --max-time 2 "http://127.0.0.1:$stats_port/stats.json" | python3 -c '
import json, sys
c = json.load(sys.stdin)["connections"]
print(c["open"], c["refused_per_source"] + c["refused_total"])'
}

# measure PHASE: the normal client through the lb (ROUNDS wrk runs, each
# followed by the same run straight at backend b1, the machine's own noise) and
# to the dns. The phase's figures are the medians of its rounds.
results="$tmp/results.tsv"
printf 'phase\trps\tp99_ms\terrors\tnon2xx\tdirect_p99_ms\tdns_udp_p99_ms\tdns_udp_failed\tdns_tcp_p99_ms\tdns_tcp_failed\tflood\tlb_open\tlb_refused\n' >"$results"
measure() { # phase flood-summary
  local phase=$1 flood=$2 dnsout lbc r
  for ((r = 1; r <= rounds; r++)); do
    timeout $((run_seconds + 30)) wrk -t1 -c"$connections" -d"${run_seconds}s" -H 'Host: web.service' --latency \
      "http://127.0.0.1:$lb_port/" >"$tmp/wrk-$phase-$r.out" 2>&1 \
      || die "wrk failed in phase $phase: $(tail -3 "$tmp/wrk-$phase-$r.out")"
    timeout $((run_seconds + 30)) wrk -t1 -c"$connections" -d"${run_seconds}s" --latency \
      "http://127.0.0.1:$b1_port/" >"$tmp/direct-$phase-$r.out" 2>&1 \
      || die "wrk to the backend failed in phase $phase: $(tail -3 "$tmp/direct-$phase-$r.out")"
  done
  dnsout=$(python3 "$tmp/dnsclient.py" "$dns_port" 2000) || die "the dns client failed in phase $phase"
  lbc=$(lb_conns) || die "the lb stats listener does not answer"
  check_alive
  python3 - "$phase" "$tmp" "$rounds" "$dnsout" "$flood" "$lbc" >>"$results" <<'EOF'
import re, sys
from benchstats import med, wrk_ms
phase, tmp, rounds, dnsout, flood, lbc = sys.argv[1:]
def parse(out):
    text = open(out).read()
    dist = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", text, re.M))
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not rps or "99" not in dist:
        raise SystemExit(f"lb-flood: cannot parse wrk output {out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return (float(rps.group(1)), wrk_ms(dist["99"], out),
            sum(int(x) for x in errors.groups()) if errors else 0, int(non2xx.group(1)) if non2xx else 0)
lb = [parse(f"{tmp}/wrk-{phase}-{r}.out") for r in range(1, int(rounds) + 1)]
direct = [parse(f"{tmp}/direct-{phase}-{r}.out") for r in range(1, int(rounds) + 1)]
print("\t".join([phase, f"{med([x[0] for x in lb]):.0f}", f"{med([x[1] for x in lb]):.3f}",
                 str(sum(x[2] for x in lb)), str(sum(x[3] for x in lb)), f"{med([x[1] for x in direct]):.3f}",
                 *dnsout.split(), flood, *lbc.split()]))
EOF
  tail -n 1 "$results" | awk -F'\t' '{printf "  %-10s lb: %8.0f req/s  p99 %8.3f ms  errors %s non-2xx %s (direct to a backend: p99 %s ms) | dns p99 udp %s ms (failed %s), tcp %s ms (failed %s) | lb sees %s open, %s refused since start\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13}'
}

# flood PHASE N_LB SOURCE...: opens the flood (N_LB lb connections spread over
# the sources, FLOOD_DNS dns ones from the first) in shards of at most 8000
# sockets per process, measures while it is held, ends it.
shard_max=8000
flood() {
  local phase=$1 n_lb=$2
  shift 2
  local nsrc=$# shards total=$((n_lb + flood_dns)) k lb_k dns_k
  shards=$(((total + shard_max - 1) / shard_max))
  rm -f "$tmp"/ready-"$phase"-* "$tmp"/final-"$phase"-*
  local started=()
  for ((k = 0; k < shards; k++)); do
    # Shard k: its share of the lb flood; the dns flood goes to the last shards.
    lb_k=$(((n_lb * (k + 1)) / shards - (n_lb * k) / shards))
    dns_k=$(((flood_dns * (k + 1)) / shards - (flood_dns * k) / shards))
    start "flood-$phase-$k" python3 "$tmp/flood.py" "$tmp/ready-$phase-$k" "$tmp/final-$phase-$k" \
      "$lb_port" "$lb_k" "$dns_port" "$dns_k" "$@"
    started+=("flood-$phase-$k")
  done
  for _ in $(seq 600); do
    local all=1
    for ((k = 0; k < shards; k++)); do [ -s "$tmp/ready-$phase-$k" ] || all=0; done
    [ $all = 1 ] && break
    check_alive
    sleep 0.5
  done
  for ((k = 0; k < shards; k++)); do
    [ -s "$tmp/ready-$phase-$k" ] || die "the flood of phase $phase did not finish opening in 300 s"
  done
  local h
  read -r -a h < <(cat "$tmp"/ready-"$phase"-* | awk '{for (i = 1; i <= 6; i++) s[i] += $i} END {print s[1], s[2], s[3], s[4], s[5], s[6]}')
  echo "  flood $phase from $nsrc source(s), $shards client processes: lb $n_lb opened: ${h[0]} held, ${h[1]} closed by the lb, ${h[2]} refused or reset at connect; dns $flood_dns: ${h[3]} held, ${h[4]} closed, ${h[5]} refused or reset"
  measure "$phase" "lb:${h[0]}/${h[1]}/${h[2]},dns:${h[3]}/${h[4]}/${h[5]}"
  local name
  for name in "${started[@]}"; do
    kill -TERM "${pid_of[$name]}" 2>/dev/null || true
    wait "${pid_of[$name]}" 2>/dev/null || true
  done
  # They were the last ones started: off the list check_alive and the trap go through.
  pids=("${pids[@]:0:${#pids[@]}-$shards}")
  names=("${names[@]:0:${#names[@]}-$shards}")
  if read -r -a h < <(cat "$tmp"/final-"$phase"-* 2>/dev/null | awk '{for (i = 1; i <= 6; i++) s[i] += $i} END {if (NR) print s[1], s[2], s[3], s[4], s[5], s[6]}'); then
    echo "  flood $phase at its end: lb ${h[0]} still held, dns ${h[3]} still held"
  fi
  # Wait until the lb has let go of the flood before the next phase.
  for _ in $(seq 100); do
    read -r open _ < <(lb_conns)
    [ "${open:-0}" -le $((connections + 4)) ] && break
    sleep 0.2
  done
}

echo "phases (normal client on 127.0.0.1: $rounds x wrk -t1 -c$connections ${run_seconds}s through the lb and direct; 2000 UDP + 200 TCP DNS queries):"
# Warm-up: the lb's backend pool and nginx.
timeout 30 wrk -t1 -c"$connections" -d2s -H 'Host: web.service' "http://127.0.0.1:$lb_port/" >"$tmp/warm.out" 2>&1 \
  || die "wrk warm-up failed: $(tail -3 "$tmp/warm.out")"
measure baseline none
flood one-source "$flood_lb" 127.0.0.2
spread_sources=()
for i in $(seq 2 $((spread + 1))); do spread_sources+=("127.0.0.$i"); done
flood spread "$spread_lb" "${spread_sources[@]}"

echo
python3 - "$results" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
base, base_direct = float(rows[0][2]), float(rows[0][5])
print(f"{'phase':<11} {'lb held/closed/reset':>22} {'p99 ms':>8} {'x base':>6} {'errors':>6} {'direct p99':>10} {'x base':>6} {'lb/direct':>9} {'dns udp p99':>11} {'dns tcp p99':>11} {'tcp failed':>10}")
met = True
for r in rows:
    phase, rps, p99, err, non2xx, direct, udp, udpf, tcp, tcpf, flood = r[:11]
    lb = flood.split(",")[0].split(":")[-1] if flood != "none" else "-"
    ratio = float(p99) / base if base > 0 else float("nan")
    dratio = float(direct) / base_direct if base_direct > 0 else float("nan")
    print(f"{phase:<11} {lb:>22} {float(p99):8.3f} {ratio:6.2f} {int(err) + int(non2xx):>6} {float(direct):10.3f} {dratio:6.2f} {ratio / dratio if dratio > 0 else float('nan'):9.2f} {udp:>11} {tcp:>11} {tcpf:>10}")
    if phase != "baseline" and (ratio > 2 or int(err) + int(non2xx) > 0):
        met = False
print("target (normal client served without errors, lb p99 within 2x of the baseline, medians of the rounds): " + ("met" if met else "MISSED"))
print("direct: the same wrk run straight at one backend after each lb run; its ratio moving with the lb's says the machine, not the lb")
print("lb/direct: the lb's p99 ratio divided by the direct one: what the flood did to the lb beyond what the machine did to everyone")
EOF
echo "elapsed: ${SECONDS}s"
