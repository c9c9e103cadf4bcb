#!/usr/bin/env bash
# How fast does a Consul change reach Wayfinder's routing, and does any request fail
# meanwhile? One Consul dev agent, one `wayfinder lb`, nginx backends registered as
# service `prop` (tag `haproxy`, TTL checks), a background load loop through the
# LB, then CHANGES Consul changes in a row, each timed from the Consul API call
# returning to the first request routed accordingly. See benches/README.md.
#
#   benches/lb-propagation.sh               # CHANGES=100
#   CHANGES=400 benches/lb-propagation.sh
#
# Environment (all optional):
#   CHANGES       number of changes, cycling through the four kinds below    (100)
#   POLL_MS       interval between two probe requests, ms                    (2)
#   GONE_AFTER    consecutive probe answers without the instance that count
#                 as "removed"                                               (5)
#   GAP_MS        pause between the detection of one change and the next     (0)
#   CHANGE_TIMEOUT  seconds a change may take before it counts as missed     (5)
#   LOAD_RPS      request rate of the background load loop, total            (1000)
#   LOAD_CONNS    keep-alive connections of the load loop                    (2)
#   KEEP_TMP=1    keep the temp dir (configs, logs, per-change samples)
#
# What is measured (per change):
#   Three base instances a, b, c (`haproxy_weight=1`) are always passing. The
#   changes cycle through, for one extra instance x (`haproxy_weight=256`, its own
#   backend answering "x"):
#     register   PUT /v1/agent/service/register (x, TTL check, initially passing)
#     fail       PUT /v1/agent/check/fail/service:prop-x
#     pass       PUT /v1/agent/check/pass/service:prop-x
#     deregister PUT /v1/agent/service/deregister/prop-x
#   t0 = the moment the Consul API call returned (its response fully read). Then a
#   probe sends a new request (keep-alive connection, `Host: prop.service`) every
#   POLL_MS ms. For register/pass, the time is t0 -> the response that came from x
#   was received. For fail/deregister, t0 -> the receipt of the first response not
#   from x that is followed by GONE_AFTER-1 more such responses (GONE_AFTER in a
#   row). x's weight is 256 against 1+1+1, so while x is routable 256 of every 259
#   picks go to it: its appearance is seen by the first probe after the new table
#   is live, and GONE_AFTER non-x answers in a row cannot happen by chance
#   (smooth weighted round-robin never picks two non-x in a row then). The figure
#   therefore includes Consul's own work (catalog write, blocking-query wake-up),
#   Wayfinder's watch, table build and swap, and up to one probe interval plus one
#   request round trip.
#
# Load loop: LOAD_CONNS threads of a python3 http.client keep-alive client send
# `GET / Host: prop.service` at LOAD_RPS in total (bounded: it stops by itself
# after 30 minutes) from before the first change to after the last; any answer
# other than 200, and any connection error or timeout (5 s), counts as failed.
#
# Exit status: 0 when the measurement ran (targets met or not); non-zero when a
# component fails to start or to answer.
set -euo pipefail

SECONDS=0
changes=${CHANGES:-100}
poll_ms=${POLL_MS:-2}
gone_after=${GONE_AFTER:-5}
gap_ms=${GAP_MS:-0}
change_timeout=${CHANGE_TIMEOUT:-5}
load_rps=${LOAD_RPS:-1000}
load_conns=${LOAD_CONNS:-2}

BENCH_NAME='lb-propagation'
BENCH_STOP_ORDER=reverse
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "== lb-propagation: Consul change -> Wayfinder routing, under load"
echo "command:  CHANGES=$changes POLL_MS=$poll_ms GONE_AFTER=$gone_after GAP_MS=$gap_ms CHANGE_TIMEOUT=$change_timeout LOAD_RPS=$load_rps LOAD_CONNS=$load_conns $0 $*"
print_machine

# --- packages: nginx for the backends (and Consul via install-deps) ---------------
apt_install_missing nginx-light
command -v consul >/dev/null 2>&1 || scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
echo "versions: $("$nginx_bin" -v 2>&1 | awk -F/ '{print "nginx", $2}'), $(consul version | head -1), $(python3 --version)"

build_wayfinder "$repo"

setup_tmp
chmod 755 "$tmp" # nginx workers run as nobody

# --- ports: free on 127.0.0.1 (TCP and UDP: Consul's serf and DNS use both) -------
read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_wf p_a p_b p_c p_x < <(free_ports 11)
echo "ports:    consul http=$p_http, wayfinder=$p_wf, backends a=$p_a b=$p_b c=$p_c x=$p_x"

# --- backends: one nginx, four listeners, each answering its own name ---------------
mkdir -p "$tmp/backends/logs"
{
  cat <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $tmp/backends/nginx.pid;
error_log $tmp/backends/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  default_type text/plain;
EOF
  for n in a b c x; do
    port_var=p_$n
    printf '  server { listen 127.0.0.1:%s; location / { return 200 "%s\\n"; } }\n' "${!port_var}" "$n"
  done
  echo "}"
} >"$tmp/backends/nginx.conf"
"$nginx_bin" -t -q -p "$tmp/backends/" -c "$tmp/backends/nginx.conf" 2>"$tmp/backends-check.log" \
  || die "backend nginx config is invalid: $(cat "$tmp/backends-check.log")"
start backends "$nginx_bin" -p "$tmp/backends/" -c "$tmp/backends/nginx.conf"

# --- Consul dev agent, service prop = a, b, c ----------------------------------------
start_consul "$p_http" "$p_cdns" "$p_grpc" "$p_serf_lan" "$p_serf_wan" "$p_server" \
  'disable_update_check = true'
for n in a b c; do
  port_var=p_$n
  curl -sf --max-time 5 -X PUT "http://127.0.0.1:$p_http/v1/agent/service/register" \
    -d "{\"ID\":\"prop-$n\",\"Name\":\"prop\",\"Address\":\"127.0.0.1\",\"Port\":${!port_var},\"Tags\":[\"haproxy\",\"haproxy_weight=1\"],\"Check\":{\"TTL\":\"1h\",\"Status\":\"passing\"}}" \
    || die "registering prop-$n in consul"
done

# --- Wayfinder ------------------------------------------------------------------------
write_lb_config "$p_http" "$p_cdns" "$p_wf"
# info for the watch module: its "routing table updated" lines carry Wayfinder's own
# propagation figure (Consul's answer received -> table live), reported next to ours.
start wayfinder env RUST_LOG=warn,wayfinder::lb::watch=info "$wayfinder" lb -c "$tmp/wayfinder.toml"

# Ready when a, b and c all answer through the LB (and nothing else does).
seen=""
for _ in $(seq 100); do
  check_alive
  seen=$(for _ in 1 2 3 4 5 6; do
    curl -s --max-time 2 -H 'Host: prop.service' "http://127.0.0.1:$p_wf/" 2>/dev/null || echo "error"
  done | sort -u | tr '\n' ' ')
  [ "$seen" = "a b c " ] && break
  sleep 0.2
done
[ "$seen" = "a b c " ] || die "wayfinder does not route prop.service to a, b and c (saw: ${seen:-nothing})"
echo "verified: wayfinder (port $p_wf) routes prop.service to a, b and c"

# --- background load loop -------------------------------------------------------------
cat >"$tmp/load.py" <<'EOF'
"""Keep-alive load through the LB until SIGTERM (or 30 min); prints a JSON summary."""
import http.client, json, signal, sys, threading, time
port, rps, conns = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
lock = threading.Lock()
totals = {"requests": 0, "ok": 0, "failed": 0, "by_status": {}, "by_error": {}, "by_backend": {}}

def worker():
    interval = conns / rps
    conn = None
    nxt = time.monotonic()
    local = {"requests": 0, "ok": 0, "failed": 0, "by_status": {}, "by_error": {}, "by_backend": {}}
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        local["requests"] += 1
        try:
            conn.request("GET", "/", headers={"Host": "prop.service"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace").strip()
            if resp.status == 200:
                local["ok"] += 1
                local["by_backend"][body] = local["by_backend"].get(body, 0) + 1
            else:
                local["failed"] += 1
                local["by_status"][resp.status] = local["by_status"].get(resp.status, 0) + 1
        except Exception as e:  # connection reset, timeout, bad answer
            local["failed"] += 1
            name = type(e).__name__
            local["by_error"][name] = local["by_error"].get(name, 0) + 1
            conn.close()
            conn = None
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            nxt = time.monotonic()
    with lock:
        for k in ("requests", "ok", "failed"):
            totals[k] += local[k]
        for k in ("by_status", "by_error", "by_backend"):
            for kk, v in local[k].items():
                totals[k][str(kk)] = totals[k].get(str(kk), 0) + v

started = time.monotonic()
threads = [threading.Thread(target=worker, daemon=True) for _ in range(conns)]
for t in threads:
    t.start()
stop.wait(1800)
stop.set()
for t in threads:
    t.join(10)
totals["seconds"] = round(time.monotonic() - started, 2)
print(json.dumps(totals), flush=True)
EOF
start load python3 "$tmp/load.py" "$p_wf" "$load_rps" "$load_conns"
sleep 1
check_alive

# --- the changes -----------------------------------------------------------------------
wf_log_lines=$(wc -l <"$tmp/wayfinder.log")
cat >"$tmp/changes.py" <<'EOF'
"""Makes the changes one after another and times each; writes one line per change."""
import http.client, json, sys, time
(consul_port, wf_port, x_port, changes, poll_ms, gone_after, gap_ms, timeout_s, out) = sys.argv[1:]
changes, gone_after, timeout_s = int(changes), int(gone_after), float(timeout_s)
poll, gap = float(poll_ms) / 1000, float(gap_ms) / 1000
consul = http.client.HTTPConnection("127.0.0.1", int(consul_port), timeout=10)
probe = None
stats = {"probes": 0, "probe_failed": 0}

def consul_put(path, body=None):
    consul.request("PUT", path, body=json.dumps(body) if body is not None else None)
    resp = consul.getresponse()
    text = resp.read()
    if resp.status != 200:
        raise SystemExit(f"lb-propagation: consul PUT {path}: {resp.status} {text!r}")

def ask():
    """One probe request: (receipt time, body or None on failure)."""
    global probe
    stats["probes"] += 1
    try:
        if probe is None:
            probe = http.client.HTTPConnection("127.0.0.1", int(wf_port), timeout=5)
        probe.request("GET", "/", headers={"Host": "prop.service"})
        resp = probe.getresponse()
        body = resp.read().decode(errors="replace").strip()
        if resp.status != 200:
            stats["probe_failed"] += 1
            return time.monotonic(), None
        return time.monotonic(), body
    except Exception:
        stats["probe_failed"] += 1
        if probe is not None:
            probe.close()
        probe = None
        return time.monotonic(), None

def wait_for(t0, present):
    """Seconds from t0 until x is seen (present) / gone GONE_AFTER times in a row."""
    streak_start, streak = None, 0
    nxt = t0
    while True:
        at, body = ask()
        if body is not None:
            if present and body == "x":
                return at - t0
            if not present:
                if body != "x":
                    if streak == 0:
                        streak_start = at
                    streak += 1
                    if streak >= gone_after:
                        return streak_start - t0
                else:
                    streak = 0
        if at - t0 > timeout_s:
            return None
        nxt += poll
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()

x = {"ID": "prop-x", "Name": "prop", "Address": "127.0.0.1", "Port": int(x_port),
     "Tags": ["haproxy", "haproxy_weight=256"], "Check": {"TTL": "1h", "Status": "passing"}}
kinds = [
    ("register", lambda: consul_put("/v1/agent/service/register", x), True),
    ("fail", lambda: consul_put("/v1/agent/check/fail/service:prop-x"), False),
    ("pass", lambda: consul_put("/v1/agent/check/pass/service:prop-x"), True),
    ("deregister", lambda: consul_put("/v1/agent/service/deregister/prop-x"), False),
]
with open(out, "w") as f:
    for i in range(changes):
        kind, act, present = kinds[i % len(kinds)]
        act()
        t0 = time.monotonic()
        took = wait_for(t0, present)
        f.write(f"{i + 1}\t{kind}\t{'NA' if took is None else f'{took * 1000:.3f}'}\n")
        f.flush()
        if gap > 0:
            time.sleep(gap)
    # Leave x deregistered whatever the cycle ended on.
    consul_put("/v1/agent/service/deregister/prop-x")
print(json.dumps(stats), flush=True)
EOF
echo "changing: $changes changes (register, fail, pass, deregister, ...), probe every ${poll_ms} ms, gone = $gone_after in a row, load $load_rps req/s on $load_conns connections"
started=$(date +%s.%N)
python3 "$tmp/changes.py" "$p_http" "$p_wf" "$p_x" "$changes" "$poll_ms" "$gone_after" "$gap_ms" "$change_timeout" \
  "$tmp/changes.tsv" >"$tmp/probe.json" || die "the change driver failed"
ended=$(date +%s.%N)
sleep 0.5
check_alive
kill -TERM "${pid_of[load]}"
wait "${pid_of[load]}" 2>/dev/null || true
tail -n +"$((wf_log_lines + 1))" "$tmp/wayfinder.log" >"$tmp/wayfinder-changes.log"

# --- summary -----------------------------------------------------------------------------
python3 - "$tmp/changes.tsv" "$tmp/load.log" "$tmp/probe.json" "$tmp/wayfinder-changes.log" "$started" "$ended" <<'EOF'
import json, re, sys
changes_file, load_file, probe_file, wf_log, started, ended = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(changes_file) if l.strip()]
load = json.loads(open(load_file).read().strip().splitlines()[-1])
probe = json.loads(open(probe_file).read().strip().splitlines()[-1])

def pct(values, p):
    # nearest rank
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, -(-len(v) * p // 100) - 1))
    return v[int(k)]

def fmt(v):
    return f"{v:7.2f}" if v is not None else "    n/a"

kinds = ["register", "fail", "pass", "deregister"]
all_ms = [float(r[2]) for r in rows if r[2] != "NA"]
missed = sum(1 for r in rows if r[2] == "NA")
print()
print(f"{'change':<11} {'n':>4} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'missed':>6}")
for k in kinds:
    ms = [float(r[2]) for r in rows if r[1] == k and r[2] != "NA"]
    miss = sum(1 for r in rows if r[1] == k and r[2] == "NA")
    print(f"{k:<11} {len(ms) + miss:>4} {fmt(pct(ms, 50))} {fmt(pct(ms, 99))} {fmt(max(ms) if ms else None)} {miss:>6}")
p50, p99 = pct(all_ms, 50), pct(all_ms, 99)
print(f"{'all':<11} {len(rows):>4} {fmt(p50)} {fmt(p99)} {fmt(max(all_ms) if all_ms else None)} {missed:>6}")

wf = [int(m.group(1)) / 1000 for m in re.finditer(r"propagation_us=(\d+)", open(wf_log).read())]
if wf:
    print(f"wayfinder's own figure (Consul answer received -> table live), {len(wf)} table updates: "
          f"p50 {pct(wf, 50):.3f} ms, p99 {pct(wf, 99):.3f} ms, max {max(wf):.3f} ms")
else:
    print("wayfinder's own figure: n/a (no 'propagation_us' lines in its log)")
print()
print(f"load loop: {load['requests']} requests in {load['seconds']} s, {load['ok']} ok, {load['failed']} failed"
      + (f" (status {load['by_status']}, errors {load['by_error']})" if load["failed"] else "")
      + f"; answered by {dict(sorted(load['by_backend'].items()))}")
print(f"probes:    {probe['probes']} requests, {probe['probe_failed']} failed")
print(f"changes took {float(ended) - float(started):.1f} s in total")
print()
ok_p99 = p99 is not None and p99 < 100 and missed == 0
ok_fail = load["failed"] == 0 and probe["probe_failed"] == 0
print(f"target: p99 < 100 ms: {'met' if ok_p99 else 'MISSED'} (p99 {fmt(p99).strip()} ms, {missed} missed); "
      f"zero failed requests: {'met' if ok_fail else 'MISSED'} "
      f"(load loop {load['failed']}, probes {probe['probe_failed']})")
EOF
echo
echo "lb-propagation: done in ${SECONDS}s"
