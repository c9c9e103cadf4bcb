#!/usr/bin/env bash
# How does Wayfinder's cost grow with the size of the catalog? For each size N
# (services x 3 instances), a fresh single-server Consul (default limits, not a
# dev agent: no pretty-printed JSON), the catalog registered in bulk, then
# `wayfinder up` with the lb, the dns (wildcard target `consul:<svc>`) and the
# admin endpoint, all reading one Consul view. See benches/README.md.
#
#   benches/lb-scale.sh                      # SIZES="100 1000 5000"
#   SIZES="100 500" CHANGES=20 benches/lb-scale.sh
#
# Environment (all optional):
#   SIZES          catalog sizes, services (each with 3 instances)      ("100 1000 5000")
#   CHANGES        single changes timed per size (register, fail, pass,
#                  deregister of an extra instance, cycling)            (40)
#   LOAD_RPS       background request rate through the lb              (200)
#   IDLE_SECONDS   Consul CPU measured idle for this long              (20)
#   BUSY_SECONDS   ... and at CHANGE_RATE changes/s for this long       (20)
#   CHANGE_RATE    changes per second in the busy window               (10)
#   KEEP_TMP=1     keep the temp dir
#
# Per size it prints: time from start to the first full table (every service
# routed), propagation p50/p99 of single changes (each cycle on a service no
# one touched before: its registration is a cold change, the rest follow it),
# connections Wayfinder holds to the agent (from /proc), Consul CPU seconds per
# minute idle and at CHANGE_RATE changes/s and per change, Wayfinder's RSS
# (now and peak), the last and longest table build, and the last full sync.
#
# Exit status: 0 when the measurement ran (targets met or not).
set -euo pipefail

SECONDS=0
sizes=${SIZES:-100 1000 5000}
changes=${CHANGES:-40}
load_rps=${LOAD_RPS:-200}
idle_seconds=${IDLE_SECONDS:-20}
busy_seconds=${BUSY_SECONDS:-20}
change_rate=${CHANGE_RATE:-10}

BENCH_NAME='lb-scale'
BENCH_STOP_ORDER=reverse
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== lb-scale: Wayfinder's cost against the size of the Consul catalog"
echo "command:  SIZES=\"$sizes\" CHANGES=$changes LOAD_RPS=$load_rps IDLE_SECONDS=$idle_seconds BUSY_SECONDS=$busy_seconds CHANGE_RATE=$change_rate $0 $*"
print_machine
apt_install_missing nginx-light
command -v consul >/dev/null 2>&1 || scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
echo "versions: $("$nginx_bin" -v 2>&1 | awk -F/ '{print "nginx", $2}'), $(consul version | head -1)"
build_wayfinder "$repo"
setup_tmp
chmod 755 "$tmp"

cat >"$tmp/drive.py" <<'EOF'
"""The per-size driver: bulk registration, readiness, changes, CPU, memory."""
import http.client, json, os, random, sys, threading, time

cmd = sys.argv[1]
consul_port = int(os.environ["CONSUL_PORT"])

def consul(method, path, body=None, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", consul_port, timeout=timeout)
    c.request(method, path, body=None if body is None else json.dumps(body))
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise SystemExit(f"lb-scale: consul {method} {path}: {r.status} {data[:200]!r}")
    return data

def instance_ops(svc, i, port, status="passing"):
    node = f"node-{i}"
    sid = f"{svc}-{i}"
    return [
        {"Service": {"Verb": "set", "Node": node, "Service": {
            "ID": sid, "Service": svc, "Address": f"127.0.0.{11 + i}", "Port": port,
            "Tags": ["haproxy", "haproxy_weight=1"]}}},
        {"Check": {"Verb": "set", "Check": {
            "Node": node, "CheckID": f"{sid}-check", "Name": "bulk", "Status": status, "ServiceID": sid}}},
    ]

if cmd == "register":
    n, port = int(sys.argv[2]), int(sys.argv[3])
    ops = [{"Node": {"Verb": "set", "Node": {"Node": f"node-{i}", "Address": f"127.0.0.{11 + i}"}}} for i in range(4)]
    for s in range(n):
        for i in range(3):
            ops += instance_ops(f"svc-{s}", i, port)
    t = time.monotonic()
    for k in range(0, len(ops), 64):
        consul("PUT", "/v1/txn", ops[k:k + 64])
    print(f"{time.monotonic() - t:.1f}")

elif cmd == "ready":
    # Seconds until the last service answers through the lb.
    n, lb_port, started = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    host = f"svc-{n - 1}.service"
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=70)
            c.request("GET", "/", headers={"Host": host})
            r = c.getresponse()
            r.read()
            if r.status == 200:
                break
        except OSError:
            pass
        if time.time() - started > 300:
            raise SystemExit("lb-scale: not routed after 300 s")
        time.sleep(0.05)
    # Every service, once.
    c = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=10)
    bad = 0
    for s in range(n):
        c.request("GET", "/", headers={"Host": f"svc-{s}.service"})
        r = c.getresponse()
        r.read()
        bad += r.status != 200
    print(f"{time.time() - started:.2f} {bad}")

elif cmd == "changes":
    # Single changes, one after another, each on its own service: register x
    # (a cold change), fail x, pass x, deregister x.
    n, lb_port, x_port, count = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    probe = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
    def ask(host):
        global probe
        try:
            probe.request("GET", "/", headers={"Host": host})
            r = probe.getresponse()
            return r.read().decode().strip() if r.status == 200 else None
        except Exception:
            probe = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
            return None
    def wait(host, present, t0):
        streak = 0
        first = None
        while time.monotonic() - t0 < 10:
            body = ask(host)
            at = time.monotonic()
            if present and body == "x":
                return (at - t0) * 1000
            if not present and body is not None and body != "x":
                if streak == 0:
                    first = at
                streak += 1
                if streak >= 5:
                    return (first - t0) * 1000
            elif not present:
                streak = 0
            time.sleep(0.002)
        return None
    services = random.Random(7).sample(range(n), min(n, (count + 3) // 4))
    rows = []
    for k in range(count):
        svc = f"svc-{services[k // 4]}"
        host = f"{svc}.service"
        kind = ["register", "fail", "pass", "deregister"][k % 4]
        x = {"Node": "node-3", "Address": "127.0.0.14",
             "Service": {"ID": f"{svc}-x", "Service": svc, "Address": "127.0.0.1", "Port": x_port,
                         "Tags": ["haproxy", "haproxy_weight=256"]},
             "Check": {"Node": "node-3", "CheckID": f"{svc}-x-check", "Name": "x", "ServiceID": f"{svc}-x",
                       "Status": "critical" if kind == "fail" else "passing"}}
        if kind == "deregister":
            consul("PUT", "/v1/catalog/deregister", {"Node": "node-3", "ServiceID": f"{svc}-x"})
        elif kind == "register":
            consul("PUT", "/v1/catalog/register", x)
        else:
            consul("PUT", "/v1/catalog/register", {"Node": "node-3", "Address": "127.0.0.14", "SkipNodeUpdate": True,
                                                     "Check": x["Check"]})
        t0 = time.monotonic()
        took = wait(host, kind in ("register", "pass"), t0)
        rows.append((kind, took))
        time.sleep(0.2)
    json.dump(rows, sys.stdout)

elif cmd == "churn":
    # CHANGE_RATE changes/s for SECONDS: check flips and extra instances of random services.
    n, rate, seconds = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    rnd = random.Random(11)
    done = 0
    t0 = time.monotonic()
    nxt = t0
    while time.monotonic() - t0 < seconds:
        s = rnd.randrange(n)
        svc = f"svc-{s}"
        if done % 2 == 0:
            i = rnd.randrange(3)
            status = rnd.choice(["passing", "critical"])
            consul("PUT", "/v1/catalog/register", {"Node": f"node-{i}", "Address": f"127.0.0.{11 + i}",
                   "SkipNodeUpdate": True, "Check": {"Node": f"node-{i}", "CheckID": f"{svc}-{i}-check",
                   "Name": "bulk", "ServiceID": f"{svc}-{i}", "Status": status}})
        else:
            consul("PUT", "/v1/catalog/deregister", {"Node": "node-3", "ServiceID": f"{svc}-y"})
            consul("PUT", "/v1/catalog/register", {"Node": "node-3", "Address": "127.0.0.14",
                   "Service": {"ID": f"{svc}-y", "Service": svc, "Address": "127.0.0.14", "Port": 1,
                               "Tags": ["other"]}})
        done += 1
        nxt += 1 / rate
        time.sleep(max(0, nxt - time.monotonic()))
    print(done)

elif cmd == "load":
    # Bounded keep-alive load on random services until SIGTERM.
    import signal
    n, lb_port, rps = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rnd = random.Random(3)
    c = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
    ok = failed = 0
    nxt = time.monotonic()
    while not stop.is_set():
        try:
            c.request("GET", "/", headers={"Host": f"svc-{rnd.randrange(n)}.service"})
            r = c.getresponse()
            r.read()
            ok += r.status == 200
            failed += r.status != 200
        except Exception:
            failed += 1
            c = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
        nxt += 1 / rps
        stop.wait(max(0, nxt - time.monotonic()))
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)
EOF

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)
metric() { curl -s --max-time 5 "http://127.0.0.1:$p_admin/metrics" | awk -v m="$1" '$1 == m {print $2}' | tail -1; }
conns_to() { # pid port: ESTABLISHED connections of pid to port
  local pid=$1 port=$2 inodes
  inodes=$(find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n' | sort -u)
  awk -v hex="$(printf ':%04X' "$port")" 'NR > 1 && $3 ~ hex"$" && $4 == "01" {print $10}' "/proc/$pid/net/tcp" "/proc/$pid/net/tcp6" \
    | sort -u | comm -12 - <(echo "$inodes") | wc -l
}

results=()
for n in $sizes; do
  echo
  echo "--- N = $n services x 3 instances"
  read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_dns p_lb p_admin p_base p_x < <(free_ports 11)
  rm -rf "$tmp/consul-$n" && mkdir -p "$tmp/consul-$n" "$tmp/nginx-$n/logs"
  cat >"$tmp/nginx-$n/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx-$n/nginx.pid;
error_log $tmp/nginx-$n/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  default_type text/plain;
  server { listen $p_base; location / { return 200 "base\n"; } }
  server { listen 127.0.0.1:$p_x; location / { return 200 "x\n"; } }
}
EOF
  start "nginx-$n" "$nginx_bin" -p "$tmp/nginx-$n/" -c "$tmp/nginx-$n/nginx.conf"
  start "consul-$n" consul agent -server -bootstrap-expect 1 -data-dir "$tmp/consul-$n" -node "bench-$n" \
    -bind 127.0.0.1 -client 127.0.0.1 -http-port "$p_http" -dns-port "$p_cdns" -grpc-port "$p_grpc" \
    -serf-lan-port "$p_serf_lan" -serf-wan-port "$p_serf_wan" -server-port "$p_server" \
    -hcl 'disable_update_check = true'
  consul_pid=${pid_of[consul-$n]}
  for _ in $(seq 150); do
    leader=$(curl -s --max-time 1 "http://127.0.0.1:$p_http/v1/status/leader" || true)
    [[ "$leader" =~ ^\"[^\"]+\"$ ]] && break
    sleep 0.2
  done
  [[ "$leader" =~ ^\"[^\"]+\"$ ]] || die "consul has no leader"
  export CONSUL_PORT=$p_http
  reg_s=$(python3 "$tmp/drive.py" register "$n" "$p_base")
  echo "registered $n x 3 instances in ${reg_s} s"

  cat >"$tmp/wf-$n.toml" <<EOF
[consul]
http = "127.0.0.1:$p_http"
dns = ["127.0.0.1:$p_cdns"]
[dns]
listen = ["127.0.0.1:$p_dns"]
upstreams = ["127.0.0.1:9"]
zones_dir = "$tmp/nozones"
wildcard_domain = ".apps.scale.test"
wildcard_targets = ["consul:svc-0"]
[lb]
http = "127.0.0.1:$p_lb"
stats = ""
register = ""
ready_timeout = "120s"
[supervisor]
admin = "127.0.0.1:$p_admin"
EOF
  started=$(date +%s.%N)
  start "wayfinder-$n" env RUST_LOG=warn START_CONSUL=false "$wayfinder" up -c "$tmp/wf-$n.toml"
  wf_pid=${pid_of[wayfinder-$n]}
  read -r ready_s unrouted < <(python3 "$tmp/drive.py" ready "$n" "$p_lb" "$started")
  echo "first full table: every service routed after ${ready_s} s ($unrouted not routed)"

  start "load-$n" python3 "$tmp/drive.py" load "$n" "$p_lb" "$load_rps"
  sleep 1
  python3 "$tmp/drive.py" changes "$n" "$p_lb" "$p_x" "$changes" >"$tmp/changes-$n.json"
  kill -TERM "${pid_of[load-$n]}"
  wait "${pid_of[load-$n]}" 2>/dev/null || true
  load=$(tail -1 "$tmp/load-$n.log")

  # Consul CPU: idle, then at CHANGE_RATE changes/s.
  sleep 2
  c0=$(cpu_of "$consul_pid")
  sleep "$idle_seconds"
  c1=$(cpu_of "$consul_pid")
  done_changes=$(python3 "$tmp/drive.py" churn "$n" "$change_rate" "$busy_seconds")
  c2=$(cpu_of "$consul_pid")
  sleep 2
  conns=$(conns_to "$wf_pid" "$p_http")
  rss=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$wf_pid/status")
  hwm=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$wf_pid/status")
  build_s=$(metric wayfinder_lb_table_build_seconds)
  sync_s=$(metric wayfinder_consul_full_sync_seconds)
  gauge=$(metric wayfinder_consul_connections)
  results+=("$(python3 - "$n" "$ready_s" "$tmp/changes-$n.json" "$conns" "$gauge" "$c0" "$c1" "$c2" "$clk" \
    "$idle_seconds" "$busy_seconds" "$done_changes" "$rss" "$hwm" "$build_s" "$sync_s" "$load" <<'EOF'
import json, sys
(n, ready, changes_file, conns, gauge, c0, c1, c2, clk, idle, busy, done, rss, hwm, build, sync, load) = sys.argv[1:]
rows = json.load(open(changes_file))
def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[max(0, min(len(v) - 1, -(-len(v) * p // 100) - 1))]
ms = [t for _, t in rows if t is not None]
cold = [t for k, t in rows if k == "register" and t is not None]
missed = sum(1 for _, t in rows if t is None)
clk = float(clk)
idle_min = (float(c1) - float(c0)) / clk / float(idle) * 60
busy_min = (float(c2) - float(c1)) / clk / float(busy) * 60
per_change_ms = ((float(c2) - float(c1)) / clk - (float(c1) - float(c0)) / clk / float(idle) * float(busy)) / max(1, int(done)) * 1000
load = json.loads(load)
print(f"{n}\t{ready}\t{pct(ms, 50):.1f}\t{pct(ms, 99):.1f}\t{pct(cold, 50):.1f}\t{missed}\t{conns}/{gauge}\t"
      f"{idle_min:.2f}\t{busy_min:.2f}\t{per_change_ms:.2f}\t{rss}/{hwm}\t{float(build or 0) * 1000:.2f}\t"
      f"{float(sync or 0) * 1000:.0f}\t{load['failed']}")
EOF
)")
  echo "${results[-1]}" | awk -F'\t' '{printf "propagation p50 %s ms, p99 %s ms (cold registrations p50 %s ms, %s missed); connections %s; consul cpu %s s/min idle, %s s/min busy, %s ms/change; rss %s MB; table build %s ms; full sync %s ms; failed requests %s\n", $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14}'
  for name in "load-$n" "wayfinder-$n" "consul-$n" "nginx-$n"; do
    kill -TERM "${pid_of[$name]}" 2>/dev/null || true
    wait "${pid_of[$name]}" 2>/dev/null || true
  done
done

echo
printf '%-6s %9s %8s %8s %9s %6s %9s %10s %10s %10s %11s %9s %9s %6s\n' N "ready s" "p50 ms" "p99 ms" "cold p50" missed "conns" "idle s/m" "busy s/m" "ms/change" "rss/peak MB" "build ms" "sync ms" failed
for r in "${results[@]}"; do
  echo "$r" | awk -F'\t' '{printf "%-6s %9s %8s %8s %9s %6s %9s %10s %10s %10s %11s %9s %9s %6s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14}'
done
echo
echo "targets at 5000 x 3: everything routed, propagation p99 < 100 ms, at most 8 connections, RSS < 200 MB,"
echo "Consul CPU per change flat as N grows (compare ms/change across the rows)"
echo "lb-scale: done in ${SECONDS}s"
