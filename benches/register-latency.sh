#!/usr/bin/env bash
# How fast does a container started (or stopped) on the host reach Consul and the
# lb, how many Consul writes does the register component make while nothing
# changes, and how much CPU does Wayfinder spend per Docker event? Issue 19's
# benchmark. Its own dockerd, Consul dev agent and `wayfinder up` (register + lb),
# then one round per size: N containers started in parallel bursts, the system
# left idle, the N stopped and removed. See benches/README.md.
#
#   benches/register-latency.sh                      # SIZES="10 100 500", about 6 minutes
#   SIZES="10 100" benches/register-latency.sh       # quick look, about 2 minutes
#
# Environment (all optional):
#   SIZES          containers per round, one round each                      (10 100 500)
#   PARALLEL       docker run / stop / rm commands in flight (xargs -P)       (8)
#   POLLERS        lb probe threads                                           (4)
#   POLL_MS        least interval between two probes of one service, ms       (2)
#   RESYNC         register.resync, whole seconds                             (2)
#   IDLE_PERIODS   resync periods of each idle window                         (3)
#   PHASE_TIMEOUT  seconds after the last docker command before a container
#                  not yet (de)registered / (un)routed counts as missed       (60)
#   WAYFINDER      a wayfinder binary to measure instead of building this tree
#   INSPECT_PROBE=1  also time one `GET /containers/<name>/json` at each start and
#                  kill event (a diagnostic: how long dockerd makes the component's
#                  inspect wait; one more API call per event)
#   KEEP_TMP=1     keep the temp dir (configs, logs, events, per-container samples)
#
# Containers: `docker run -d --name bench-i -e SERVICE_NAME=app-i -e SERVICE_TAGS=haproxy
# -p PORT:8080 wf-bench:app` (busybox httpd; PORT a free host port below the kernel's
# ephemeral range, see round.py), PARALLEL commands in flight as `xargs -P` would.
#
# What is measured (per container i of a round, all times from one clock: Docker's
# event times and python's time.time_ns() are both the host's CLOCK_REALTIME):
#   t0  the `start` event of bench-i (Docker's timeNano, from a `docker events`
#       client running through the round, container and network events)
#   t1  the first Consul answer whose catalog lists service app-i (a blocking-query
#       watcher on /v1/catalog/services, time taken when the answer is read)
#   t2  when the first probe the lb answers 200 for `Host: app-i.service.consul`
#       was sent (probes on keep-alive connections, POLLERS threads; a service is
#       probed from t1 on, at most every POLL_MS, until it answers 200: the lb
#       cannot route what the catalog does not hold yet; the probe interval
#       actually achieved is printed as the granularity)
#   register = t1 - t0, routed = t2 - t0. Then, stopping: t0' = the first `kill`
#   event (docker stop's SIGTERM, which the component drains on), t1' = the first
#   catalog answer without app-i, t2' = the first probe the lb answers as it
#   answers an unknown Host (503 "No service answers to this name."): deregister
#   = t1' - t0', unrouted = t2' - t0'.
#   Wayfinder's log ("register: registered" lines) splits register into
#   event -> agent write done (Wayfinder) and write -> catalog (Consul's agent).
# Idle: with the N containers running, and again after they are removed, the
# register counters are read IDLE_PERIODS x RESYNC apart: every write in that
# window (wayfinder_register_writes_total, any op) counts (target 0).
# CPU: utime + stime of the wayfinder process (all threads but the lb's proxy
# threads, which answer the probes) over the start and stop phases, divided by
# the Docker events the component counted (wayfinder_register_events_total) and
# by the containers.
#
# Exit status: 0 when the measurement ran (targets met or not); non-zero when a
# component fails to start or a docker command fails.
set -euo pipefail

SECONDS=0
sizes=${SIZES:-10 100 500}
parallel=${PARALLEL:-8}
pollers=${POLLERS:-4}
poll_ms=${POLL_MS:-2}
resync=${RESYNC:-2}
idle_periods=${IDLE_PERIODS:-3}
phase_timeout=${PHASE_TIMEOUT:-60}

BENCH_NAME='register-latency'
BENCH_STOP_ORDER=reverse
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

for v in "$parallel" "$pollers" "$poll_ms" "$resync" "$idle_periods" "$phase_timeout" $sizes; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "$BENCH_NAME: '$v' is not a positive whole number (SIZES, PARALLEL, POLLERS, POLL_MS, RESYNC, IDLE_PERIODS, PHASE_TIMEOUT)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "$BENCH_NAME: run it as root (it starts its own dockerd and bridge)" >&2; exit 2; }

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit="$commit+uncommitted"
echo "== register-latency: Docker event -> Consul -> lb routing, idle writes, CPU per event"
echo "command:  SIZES=\"$sizes\" PARALLEL=$parallel POLLERS=$pollers POLL_MS=$poll_ms RESYNC=$resync IDLE_PERIODS=$idle_periods PHASE_TIMEOUT=$phase_timeout $0 $*"
print_machine
echo "commit:   $commit"

# --- packages: dockerd, busybox-static, Consul; then the binary -------------------------
scripts/install-deps.sh --bench | tail -n 1
for c in dockerd docker docker-proxy consul ip; do
  command -v "$c" >/dev/null 2>&1 || { echo "$BENCH_NAME: $c is missing after install-deps" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "$BENCH_NAME: /bin/busybox (busybox-static) is missing" >&2; exit 1; }
echo "versions: $(dockerd --version), client $(docker --version | awk '{print $3}' | tr -d ,), $(consul version | head -1), $(python3 --version)"
build_wayfinder "$repo"

setup_tmp
# The docker CLI keeps its config here, not in ~/.docker.
export DOCKER_CONFIG="$tmp/docker-config" DOCKER_CLI_HINTS=false
mkdir -p "$DOCKER_CONFIG"

# --- its own dockerd: bridge, cgroup parent and containerd namespaces named after $dname -
# One name for everything the daemon makes (bridge, cgroup parent, containerd
# namespaces), unique to this run; the teardown below finds it all by that name.
dname="wfrl$(printf '%x' $$)"
dockerd_pid=""
docker_teardown() {
  [ -n "$dname" ] || return 0
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    local ids
    ids=$(timeout 30 docker ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
      echo "$BENCH_NAME: removing $(wc -w <<<"$ids") containers left"
      timeout 180 xargs -r -P 8 -n 10 docker rm -f <<<"$ids" >/dev/null 2>&1 || true
    fi
    kill -TERM "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 300); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  # Left by a killed daemon: its containers (in its cgroup parent) and their shims
  # (daemons of their own, named by its containerd namespace).
  local p left=()
  while read -r p; do
    [ -n "$p" ] && left+=("$p")
  done < <(cat /sys/fs/cgroup/*/"$dname"/*/cgroup.procs /sys/fs/cgroup/*/"$dname"/cgroup.procs 2>/dev/null | sort -u)
  for p in $(grep -lxz -- "$dname" /proc/[0-9]*/cmdline 2>/dev/null || true); do
    p=${p#/proc/}
    left+=("${p%/cmdline}")
  done
  [ ${#left[@]} -eq 0 ] || kill -KILL "${left[@]}" 2>/dev/null || true
  # Mounts under $tmp (overlays, netns, shm), deepest first.
  local m
  for _ in 1 2 3; do
    m=$(awk -v t="$tmp/" 'index($5, t) == 1 { print length($5), $5 }' /proc/self/mountinfo | sort -rn | cut -d' ' -f2-)
    [ -n "$m" ] || break
    while read -r p; do umount -l "$p" 2>/dev/null || true; done <<<"$m"
  done
  if [ -e "/sys/class/net/$dname" ]; then
    for p in /sys/class/net/"$dname"/brif/*; do
      [ -e "$p" ] && ip link del "${p##*/}" 2>/dev/null || true
    done
    ip link del "$dname" 2>/dev/null || true
  fi
  for _ in $(seq 50); do
    m=$(find /sys/fs/cgroup/*/"$dname" -depth -type d 2>/dev/null || true)
    [ -n "$m" ] || break
    while read -r p; do rmdir "$p" 2>/dev/null || true; done <<<"$m"
    sleep 0.1
  done
}
bench_cleanup_hook() { docker_teardown; }

# The bridge: a /22 (room for 1,000 containers) in 10.160-199.x, overlapping no
# network of this host (other daemons' bridges included); taken again if another
# process took the same one at the same moment.
ip link add "$dname" type bridge || die "cannot create bridge $dname"
bridge_ip=""
for _ in $(seq 20); do
  candidate=$(python3 - <<'EOF'
import ipaddress, random, subprocess
used = []
for cmd in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
    for tok in subprocess.run(cmd, capture_output=True, text=True).stdout.split():
        try:
            if "/" in tok:
                used.append(ipaddress.ip_network(tok, strict=False))
        except ValueError:
            pass
for _ in range(1000):
    net = ipaddress.ip_network(f"10.{random.randint(160, 199)}.{random.randrange(0, 256, 4)}.0/22")
    if not any(net.overlaps(u) for u in used):
        print(net.network_address + 1)
        break
EOF
  )
  [ -n "$candidate" ] || die "no free /22 in 10.160.0.0-10.199.255.255"
  ip addr add "$candidate/22" dev "$dname"
  if [ "$(ip -4 -o addr show | awk -v a="$candidate/22" '$4 == a' | wc -l)" = 1 ]; then
    bridge_ip=$candidate
    break
  fi
  ip addr flush dev "$dname"
done
[ -n "$bridge_ip" ] || die "could not take a /22 for bridge $dname"
ip link set "$dname" up

# dockerd 20.10 keeps an identity key (default /etc/docker/key.json): daemons
# starting at once would race to create it.
echo "{\"deprecated-key-path\": \"$tmp/key.json\"}" >"$tmp/daemon.json"
dockerd --host "unix://$tmp/d.sock" --config-file "$tmp/daemon.json" \
  --data-root "$tmp/data" --exec-root "$tmp/exec" --pidfile "$tmp/d.pid" \
  --bridge "$dname" --iptables=false --ip-masq=false --ip-forward=false --userland-proxy=true \
  --containerd-namespace "$dname" --containerd-plugins-namespace "${dname}p" \
  --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent "/$dname" \
  >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$tmp/d.sock"
for _ in $(seq 300); do
  kill -0 "$dockerd_pid" 2>/dev/null || die "dockerd exited (see $tmp/dockerd.log)"
  docker version >/dev/null 2>&1 && break
  sleep 0.1
done
docker version >/dev/null 2>&1 || die "dockerd does not answer on $DOCKER_HOST after 30 s"
echo "dockerd:  $DOCKER_HOST, bridge $dname $bridge_ip/22, $(docker info --format '{{.Driver}} storage, {{.CgroupDriver}} cgroups')"

# --- the app image: busybox-static's httpd, no registry ---------------------------------
mkdir -p "$tmp/rootfs/bin" "$tmp/rootfs/www" "$tmp/rootfs/etc" "$tmp/rootfs/tmp" \
  "$tmp/rootfs/proc" "$tmp/rootfs/sys" "$tmp/rootfs/dev"
cp /bin/busybox "$tmp/rootfs/bin/busybox"
for applet in sh httpd sleep cat echo hostname kill; do ln -s busybox "$tmp/rootfs/bin/$applet"; done
echo ok >"$tmp/rootfs/www/index.html"
# The TERM trap comes first: a signal with no handler never reaches PID 1, and
# `docker stop` would then wait its whole timeout.
cat >"$tmp/rootfs/app" <<'EOF'
#!/bin/sh
trap 'kill $pid 2>/dev/null; exit 0' TERM INT
httpd -f -p "${PORT:-8080}" -h /www &
pid=$!
wait
EOF
chmod 755 "$tmp/rootfs/app"
tar -C "$tmp/rootfs" -c . | docker import -c 'ENTRYPOINT ["/app"]' -c 'EXPOSE 8080' - wf-bench:app >/dev/null \
  || die "docker import of the app image failed"
echo "image:    wf-bench:app ($(docker image inspect --format '{{.Size}}' wf-bench:app) bytes, busybox httpd on 8080)"

# --- Consul and Wayfinder ----------------------------------------------------------------
read -r p_http p_cdns p_grpc p_serf_lan p_serf_wan p_server p_lb p_admin < <(free_ports 8)
echo "ports:    consul http=$p_http, lb=$p_lb, admin=$p_admin"
start_consul "$p_http" "$p_cdns" "$p_grpc" "$p_serf_lan" "$p_serf_wan" "$p_server" \
  'disable_update_check = true'

# The lb's active checks are set to once an hour: with the default (every 2 s, a
# TCP connect to every instance) the CPU figure would grow with N x time, not
# with the events. `register = ""`: the lb does not register itself, so the
# catalog holds only the containers' services.
cat >"$tmp/wayfinder.toml" <<EOF
[consul]
http = "127.0.0.1:$p_http"
dns = ["127.0.0.1:$p_cdns"]

[lb]
http = "127.0.0.1:$p_lb"
stats = ""
register = ""
check_interval = "1h"

[supervisor]
admin = "127.0.0.1:$p_admin"

[register]
docker = "unix://$tmp/d.sock"
resync = "${resync}s"
EOF
env START_CONSUL=false START_DNS=false HOST_IP="$bridge_ip" "$wayfinder" check -c "$tmp/wayfinder.toml" \
  >"$tmp/wayfinder-check.log" 2>&1 || die "wayfinder config is invalid: $(cat "$tmp/wayfinder-check.log")"
start wayfinder env START_CONSUL=false START_DNS=false HOST_IP="$bridge_ip" RUST_LOG=info \
  "$wayfinder" up -c "$tmp/wayfinder.toml"
for _ in $(seq 300); do
  check_alive
  grep -q '^wayfinder up: ready' "$tmp/wayfinder.log" && break
  sleep 0.1
done
grep -q '^wayfinder up: ready' "$tmp/wayfinder.log" || die "wayfinder up is not ready after 30 s"
for _ in $(seq 100); do
  curl -s --max-time 2 "http://127.0.0.1:$p_admin/metrics" | grep -qx 'wayfinder_register_event_stream_up 1' && break
  sleep 0.1
done
curl -s --max-time 2 "http://127.0.0.1:$p_admin/metrics" | grep -qx 'wayfinder_register_event_stream_up 1' \
  || die "the register component does not follow dockerd's events (wayfinder_register_event_stream_up is not 1)"
echo "verified: wayfinder up ready (register following $DOCKER_HOST, lb on $p_lb), pid ${pid_of[wayfinder]}"

# --- one round -------------------------------------------------------------------------
cat >"$tmp/round.py" <<'EOF'
"""One round: N containers started, idle, stopped and removed; times every
container's way into and out of Consul and the lb. Writes one JSON object (the
round's figures and per-container samples) to OUT."""
import http.client, json, os, re, subprocess, sys, threading, time
from datetime import datetime

(n, parallel, pollers, poll_ms, resync, idle_periods, phase_timeout, consul_port, lb_port, admin_port,
 wf_pid, image, wf_log, events_out, out, docker_sock) = sys.argv[1:]
n, parallel, pollers, resync, idle_periods = int(n), int(parallel), int(pollers), float(resync), int(idle_periods)
poll, phase_timeout, wf_pid = float(poll_ms) / 1000, float(phase_timeout), int(wf_pid)
consul_port, lb_port, admin_port = int(consul_port), int(lb_port), int(admin_port)
names = [f"app-{i}" for i in range(1, n + 1)]
index_of = {name: i for i, name in enumerate(names)}
TCK = os.sysconf("SC_CLK_TCK")
lock = threading.Lock()
stop = threading.Event()


def fail(msg):
    stop.set()
    raise SystemExit(f"register-latency: round {n}: {msg}")


# --- counters and CPU ------------------------------------------------------------------
def metrics():
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    c.request("GET", "/metrics")
    body = c.getresponse().read().decode()
    c.close()
    m = {"events": 0.0, "writes": 0.0}
    for line in body.splitlines():
        if not line.startswith("wayfinder_register_"):
            continue
        key, _, value = line.rpartition(" ")
        if key.startswith("wayfinder_register_events_total{"):
            m["events"] += float(value)
        elif key.startswith("wayfinder_register_writes_total{"):
            m["writes"] += float(value)
        m[key] = float(value)
    return m


def ticks(stat):
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def cpu():
    """(CPU seconds of the whole process, of its lb-proxy threads)."""
    total = ticks(open(f"/proc/{wf_pid}/stat").read())
    proxy = 0
    for tid in os.listdir(f"/proc/{wf_pid}/task"):
        try:
            stat = open(f"/proc/{wf_pid}/task/{tid}/stat").read()
        except OSError:
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")].startswith("lb-proxy"):
            proxy += ticks(stat)
    return total / TCK, proxy / TCK


def snapshot():
    return {"m": metrics(), "cpu": cpu(), "t": time.time()}


def delta(a, b):
    d = {k: b["m"].get(k, 0.0) - a["m"].get(k, 0.0) for k in b["m"]}
    d["cpu"] = (b["cpu"][0] - a["cpu"][0]) - (b["cpu"][1] - a["cpu"][1])
    d["cpu_proxy"] = b["cpu"][1] - a["cpu"][1]
    d["seconds"] = b["t"] - a["t"]
    return d


# --- Docker's events ---------------------------------------------------------------------
class DockerConnection(http.client.HTTPConnection):
    """HTTP to dockerd's unix socket."""

    def __init__(self):
        super().__init__("localhost", timeout=60)

    def connect(self):
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(docker_sock)


inspect_took = {"connect": {}, "start": {}, "kill": {}}


def timed_inspect(action, name):
    """INSPECT_PROBE=1: how long dockerd takes to answer an inspect of the
    container right at its event, as the component asks it."""
    try:
        c = DockerConnection()
        t = time.time_ns()
        c.request("GET", f"/containers/bench-{name[len('app-'):]}/json")  # by name: the id may not be known yet
        c.getresponse().read()
        c.close()
        with lock:
            inspect_took[action][name] = (time.time_ns() - t) / 1e6
    except Exception:
        pass


ev = {"connect": {}, "start": {}, "kill": {}, "die": {}}
ev_count = {}
app_of_id = {}
since = f"{time.time() - 1:.6f}"
# Network events too: the bridge's `connect` of a container comes while dockerd
# starts it, and the component reacts to it as to `start`.
ev_proc = subprocess.Popen(["docker", "events", "--since", since, "--filter", "type=container",
                            "--filter", "type=network", "--format", "{{json .}}"], stdout=subprocess.PIPE, text=True)
ev_file = open(events_out, "w")


def read_events():
    for line in ev_proc.stdout:
        ev_file.write(line)
        try:
            e = json.loads(line)
        except ValueError:
            continue
        actor = e.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        action = e.get("Action", e.get("status", "")).split(":")[0]
        if e.get("Type") == "network":
            app = app_of_id.get(attributes.get("container", ""))
            if app is None:
                continue
            action = "network " + action
            if action == "network connect":
                action = "connect"
        else:
            name = attributes.get("name", "")
            if not name.startswith("bench-"):
                continue
            app = "app-" + name[len("bench-"):]
            app_of_id[actor.get("ID", "")] = app
        with lock:
            ev_count[action] = ev_count.get(action, 0) + 1
            first = action in ev and app not in ev[action]
            if first:
                ev[action][app] = e["timeNano"]
        if first and docker_sock and action in inspect_took:
            threading.Thread(target=timed_inspect, args=(action, app), daemon=True).start()


# --- Consul's catalog ---------------------------------------------------------------------
present = set()
appeared, vanished = {}, {}
consul_answers = [0]


def probe_queue(name):
    return todo[index_of[name] % pollers]


def watch_consul():
    conn = http.client.HTTPConnection("127.0.0.1", consul_port, timeout=30)
    index = 0
    while not stop.is_set():
        try:
            conn.request("GET", f"/v1/catalog/services?index={index}&wait=2s")
            resp = conn.getresponse()
            body = resp.read()
            now = time.time_ns()
        except Exception:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", consul_port, timeout=30)
            time.sleep(0.05)
            continue
        new_index = int(resp.getheader("X-Consul-Index", "0"))
        index = new_index if new_index >= index else 0
        now_present = {s for s in json.loads(body) if s in index_of}
        with lock:
            consul_answers[0] += 1
            for s in now_present - present:
                if s not in appeared:
                    appeared[s] = now
                    probe_queue(s)[s] = now
            for s in present - now_present:
                if s not in vanished:
                    vanished[s] = now
                    probe_queue(s)[s] = now
            present.clear()
            present.update(now_present)
        ready.set()


# --- lb probes ----------------------------------------------------------------------------
# A service is probed from the moment the catalog has it (up) or has lost it
# (down), at most every POLL_MS, until the lb routes it (200) or answers for it
# as for an unknown Host (the same status and body). The time kept is when the
# deciding probe was sent (the lb routes a request when it arrives; how long the
# answer then took is kept apart); its granularity is the time since the
# previous probe of that service was sent, or since it became a candidate.
todo = [{} for _ in range(pollers)]  # name -> when it became a candidate (ns)
routed, unrouted, gap_up, gap_down, answer_up = {}, {}, {}, {}, {}
probes = [0, 0]  # requests, failures (connection errors)
phase = ["up"]
unknown = [None]  # (status, body) of the lb's answer to an unknown Host


def lb_get(conn, host):
    conn.request("GET", "/", headers={"Host": host})
    resp = conn.getresponse()
    return resp.status, resp.read()


def prober(k):
    conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
    last_sent = {}
    mine = todo[k]
    while not stop.is_set():
        with lock:
            candidates = list(mine.items())
            up = phase[0] == "up"
        sent = False
        for name, since_ns in candidates:
            now = time.time_ns()
            prev = last_sent.get(name)
            if prev is not None and now - prev < poll * 1e9:
                continue
            sent = True
            t_send = time.time_ns()
            try:
                answer = lb_get(conn, f"{name}.service.consul")
            except Exception:
                probes[1] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
                continue
            t_recv = time.time_ns()
            probes[0] += 1
            done = answer[0] == 200 if up else answer == unknown[0]
            if done:
                with lock:
                    (routed if up else unrouted)[name] = t_send
                    (gap_up if up else gap_down)[name] = t_send - max(since_ns, prev or 0)
                    if up:
                        answer_up[name] = t_recv - t_send
                    mine.pop(name, None)
                last_sent.pop(name, None)
            else:
                last_sent[name] = t_send
        if not sent:
            time.sleep(0.001)


# --- Wayfinder's log ----------------------------------------------------------------------
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s+INFO\b.*register: (registered|deregistered)\b.*?service=\S*?:bench-(\d+):8080\b")


def log_times(start_offset, kind):
    """First 'register: registered|deregistered' time (ns) per service, from the log's new part."""
    first = {}
    with open(wf_log, errors="replace") as f:
        f.seek(start_offset)
        for line in f:
            m = LOG_LINE.match(line)
            if not m or m.group(2) != kind:
                continue
            stamp = m.group(1)
            whole, _, frac = stamp.partition(".")
            t = datetime.fromisoformat(whole + "+00:00").timestamp()
            ns = int(t) * 1_000_000_000 + int((frac + "000000000")[:9])
            first.setdefault(f"app-{m.group(3)}", ns)
    return first


# --- docker commands ----------------------------------------------------------------------
# Host ports: chosen here, below the kernel's ephemeral range. dockerd's own
# choice (`-p 8080`) starts at the bottom of that range in every daemon, and on a
# machine shared with other daemons its 10 attempts can all collide.
used_ports = set()


def free_port():
    import random, socket
    while True:
        p = random.randint(20000, 32000)
        if p in used_ports:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("0.0.0.0", p))
        except OSError:
            continue
        used_ports.add(p)
        return p


port_retries = [0]


def run_one(i):
    """docker run of container i; a host port taken meanwhile by another process
    is retried (a few times) with another port."""
    for _ in range(5):
        r = subprocess.run(["docker", "run", "-d", "--name", f"bench-{i}", "-e", f"SERVICE_NAME=app-{i}",
                            "-e", "SERVICE_TAGS=haproxy", "-p", f"{free_port()}:8080", image],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return None
        if "address already in use" not in r.stderr:
            return r.stderr.strip()
        port_retries[0] += 1
        subprocess.run(["docker", "rm", "-f", f"bench-{i}"], capture_output=True)
    return r.stderr.strip()


def each(what, job):
    """Runs job(i) for every container number, PARALLEL at once (as `xargs -P`)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(parallel) as pool:
        errors = [e for e in pool.map(job, range(1, n + 1)) if e]
    if errors:
        fail(f"{what} failed for {len(errors)} containers: {errors[0][-600:]}")


def docker_cmd(*args):
    def job(i):
        r = subprocess.run(["docker"] + [a.replace("{}", str(i)) for a in args], capture_output=True, text=True)
        return None if r.returncode == 0 else r.stderr.strip() or f"exit {r.returncode}"
    return job


def wait_until(cond, deadline):
    while time.time() < deadline:
        with lock:
            if cond():
                return True
        time.sleep(0.005)
    with lock:
        return cond()


threads = [threading.Thread(target=read_events, daemon=True)]
ready = threading.Event()
threads.append(threading.Thread(target=watch_consul, daemon=True))
threads += [threading.Thread(target=prober, args=(k,), daemon=True) for k in range(pollers)]
c = http.client.HTTPConnection("127.0.0.1", lb_port, timeout=5)
unknown[0] = lb_get(c, "no-such-app.service.consul")
c.close()
if unknown[0][0] == 200:
    fail("the lb answers 200 for an unknown Host")
for t in threads:
    t.start()
if not ready.wait(10):
    fail("no answer from Consul's catalog")
with lock:
    if present:
        fail(f"services of an earlier round are still in Consul: {sorted(present)[:5]}")
log_offset = os.path.getsize(wf_log)
result = {"n": n, "unknown": [unknown[0][0], unknown[0][1].decode(errors="replace").strip()[:200]]}

# Start N containers.
s0 = snapshot()
t_cmd0 = time.time()
each("docker run", run_one)
result["start_commands_s"] = time.time() - t_cmd0
wait_until(lambda: len(routed) == n and len(ev["start"]) == n, time.time() + phase_timeout)
time.sleep(0.3)  # trailing events (network connect ...) counted in this phase
s1 = snapshot()
result["up"] = delta(s0, s1)

# Idle with N running: only resyncs happen; none may write. One period first, so
# that whatever the start phase left (a resync running) is over.
def running():
    r = subprocess.run(["docker", "ps", "-q", "--filter", "name=^bench-"], capture_output=True, text=True)
    return len(r.stdout.split())


time.sleep(resync)
i0 = snapshot()
result["running_before_idle"] = running()
time.sleep(idle_periods * resync)
i1 = snapshot()
result["running_after_idle"] = running()
result["idle_running"] = delta(i0, i1)

# Stop and remove them.
with lock:
    phase[0] = "down"
    for queue in todo:
        queue.clear()  # a service never routed is not probed for its removal
    gone_early = sorted(vanished)  # left Consul before the stop (exited on their own)
    for name in gone_early:
        probe_queue(name)[name] = vanished[name]
d0 = snapshot()
t_cmd0 = time.time()
each("docker stop", docker_cmd("stop", "-t", "10", "bench-{}"))
result["stop_commands_s"] = time.time() - t_cmd0
each("docker rm", docker_cmd("rm", "bench-{}"))
result["stop_rm_commands_s"] = time.time() - t_cmd0
wait_until(lambda: len(vanished) == n and len(unrouted) == n, time.time() + phase_timeout)
time.sleep(0.3)
d1 = snapshot()
result["down"] = delta(d0, d1)

# Idle with none left.
time.sleep(resync)
j0 = snapshot()
time.sleep(idle_periods * resync)
j1 = snapshot()
result["idle_empty"] = delta(j0, j1)

stop.set()
ev_proc.terminate()
ev_proc.wait(5)
for t in threads:
    t.join(5)
ev_file.close()

written = log_times(log_offset, "registered")
removed = log_times(log_offset, "deregistered")
ms = lambda a, b: None if a is None or b is None else (b - a) / 1e6
samples = []
for name in names:
    t0, k0 = ev["start"].get(name), ev["kill"].get(name)
    samples.append({
        "name": name,
        "register": ms(t0, appeared.get(name)),
        "routed": ms(t0, routed.get(name)),
        "written": ms(t0, written.get(name)),
        "write_to_catalog": ms(written.get(name), appeared.get(name)),
        "catalog_to_routed": ms(appeared.get(name), routed.get(name)),
        "gap_up": None if name not in gap_up else gap_up[name] / 1e6,
        "first_answer": None if name not in answer_up else answer_up[name] / 1e6,
        "deregister": ms(k0, vanished.get(name)),
        "unrouted": ms(k0, unrouted.get(name)),
        "deregister_written": ms(k0, removed.get(name)),
        "die_to_deregister": ms(ev["die"].get(name), vanished.get(name)),
        "gap_down": None if name not in gap_down else gap_down[name] / 1e6,
        "connect_to_start": ms(ev["connect"].get(name), t0),
        "inspect_at_connect": inspect_took["connect"].get(name),
        "inspect_at_start": inspect_took["start"].get(name),
        "inspect_at_kill": inspect_took["kill"].get(name),
    })
starts = sorted(ev["start"].values())
# Containers whose process died before `docker stop` asked (no kill first).
exited_early = sorted(k for k, t in ev["die"].items() if k not in ev["kill"] or t < ev["kill"][k])
result.update({
    "exited_early": exited_early,
    "gone_early": gone_early,
    "samples": samples,
    "docker_events": ev_count,
    "start_span_s": (starts[-1] - starts[0]) / 1e9 if len(starts) > 1 else 0.0,
    "port_retries": port_retries[0],
    "probes": probes[0],
    "probe_errors": probes[1],
    "consul_answers": consul_answers[0],
})
json.dump(result, open(out, "w"))
EOF

cat >"$tmp/report.py" <<'EOF'
"""Prints one round's details (ROUND_JSON) or, with --table, the summary of all rounds."""
import json, sys
from benchstats import fmt, pct


def col(samples, key):
    return [s[key] for s in samples if s.get(key) is not None]


def pp(values):
    return f"{fmt(pct(values, 50), '.0f')}/{fmt(pct(values, 99), '.0f')}"


def per_round(r):
    s = r["samples"]
    n = r["n"]
    early = set(r.get("exited_early", []))
    missed = {k: n - len(col(s, k)) for k in ("register", "routed")}
    missed.update({k: n - len(early) - len([x for x in s if x.get(k) is not None and x["name"] not in early])
                   for k in ("deregister", "unrouted")})
    idle = r["idle_running"]["writes"] + r["idle_empty"]["writes"]
    events = r["up"]["events"] + r["down"]["events"]
    cpu_s = r["up"]["cpu"] + r["down"]["cpu"]
    # What the process spends anyway (resyncs every RESYNC, the lb's and the
    # supervisor's own timers), from the idle windows: the phases ramp between
    # none and N containers, so they pay about the mean of the two idle rates.
    rate = lambda d: d["cpu"] / d["seconds"] if d["seconds"] > 0 else 0.0
    background = (rate(r["idle_running"]) + rate(r["idle_empty"])) / 2 * (r["up"]["seconds"] + r["down"]["seconds"])
    return {
        "n": n, "missed": missed, "idle": idle, "events": events, "cpu_s": cpu_s, "background_s": background,
        "cpu_per_event": cpu_s * 1000 / events if events else None,
        "net_per_event": (cpu_s - background) * 1000 / events if events else None,
        "cpu_per_container": cpu_s * 1000 / n,
    }


def details(path):
    r = json.load(open(path))
    s, n = r["samples"], r["n"]
    f = per_round(r)
    line = lambda label, key: print(
        f"  {label:<34} p50 {fmt(pct(col(s, key), 50), '8.1f')}  p99 {fmt(pct(col(s, key), 99), '8.1f')}"
        f"  max {fmt(max(col(s, key), default=None), '8.1f')} ms   ({len(col(s, key))}/{n})")
    print(f"round N={n}: {n} docker run in {r['start_commands_s']:.1f} s ({r['start_span_s']:.1f} s from first to last "
          f"start event; {r['port_retries']} runs retried for a host port taken meanwhile); stop+rm in "
          f"{r['stop_rm_commands_s']:.1f} s; docker events {r['docker_events']}")
    line("start event -> in Consul catalog", "register")
    line("start event -> routed by the lb", "routed")
    line("  start event -> agent write done", "written")
    line("  agent write done -> catalog", "write_to_catalog")
    line("  catalog -> routed", "catalog_to_routed")
    line("kill event -> gone from catalog", "deregister")
    line("kill event -> lb answers unknown", "unrouted")
    line("  kill event -> agent deregister done", "deregister_written")
    line("  die event -> gone from catalog", "die_to_deregister")
    line("  (docker: network connect -> start event)", "connect_to_start")
    if col(s, "inspect_at_start"):
        line("  docker inspect at the network connect", "inspect_at_connect")
        line("  docker inspect at the start event", "inspect_at_start")
        line("  docker inspect at the kill event", "inspect_at_kill")
    line("  first routed answer took", "first_answer")
    print(f"  probe granularity (last miss or candidacy -> hit): up p50 {fmt(pct(col(s, 'gap_up'), 50), '.1f')} "
          f"max {fmt(max(col(s, 'gap_up'), default=None), '.1f')} ms, down p50 {fmt(pct(col(s, 'gap_down'), 50), '.1f')} "
          f"max {fmt(max(col(s, 'gap_down'), default=None), '.1f')} ms; {r['probes']} probes "
          f"({r['probe_errors']} connection errors), {r['consul_answers']} catalog answers")
    for label, key in (("idle, N running", "idle_running"), ("idle, none left", "idle_empty")):
        d = r[key]
        print(f"  {label}: {d['writes']:.0f} writes ({d.get('wayfinder_register_resync_writes_total', 0):.0f} by resyncs) "
              f"in {d['seconds']:.1f} s, {d.get('wayfinder_register_resyncs_total', 0):.0f} resyncs, "
              f"CPU {d['cpu'] * 1000:.0f} ms ({fmt(d['cpu'] * 1000 / d['wayfinder_register_resyncs_total'] if d.get('wayfinder_register_resyncs_total') else None, '.1f')} ms per resync)")
    for label, key in (("start phase", "up"), ("stop phase", "down")):
        d = r[key]
        print(f"  {label}: {d['events']:.0f} events, {d['writes']:.0f} writes, {d.get('wayfinder_register_resyncs_total', 0):.0f} resyncs, "
              f"CPU {d['cpu'] * 1000:.0f} ms (+ {d['cpu_proxy'] * 1000:.0f} ms lb-proxy threads) in {d['seconds']:.1f} s")
    print(f"  CPU: {fmt(f['cpu_per_event'], '.2f')} ms per event, {f['cpu_per_container']:.2f} ms per container "
          f"({f['cpu_s'] * 1000:.0f} ms over {f['events']:.0f} events); net of the idle rate "
          f"(~{f['background_s'] * 1000:.0f} ms over the phases): {fmt(f['net_per_event'], '.2f')} ms per event; "
          f"missed: {f['missed']}")
    if r.get("exited_early") or r.get("running_before_idle", n) != n or r.get("running_after_idle", n) != n:
        print(f"  NOTE: containers running before/after the idle window: {r.get('running_before_idle')}/"
              f"{r.get('running_after_idle')} of {n}; exited before docker stop: {r.get('exited_early')} "
              f"(their deregistration is a write of the idle window, and not in the stop figures)")


def table(paths, nproc, commit):
    rounds = [json.load(open(p)) for p in paths]
    print(f"{'N':>5} | {'register p50/p99':>16} | {'routed p50/p99':>14} | {'deregister p50/p99':>18} | "
          f"{'unrouted p50/p99':>16} | {'idle writes':>11} | {'CPU ms/event':>12} | {'net of idle':>11} | "
          f"{'ms/container':>12} | missed")
    ok_idle, ok_missed = True, True
    largest = max(rounds, key=lambda r: r["n"]) if rounds else None
    for r in sorted(rounds, key=lambda r: r["n"]):
        s, f = r["samples"], per_round(r)
        missed = sum(f["missed"].values())
        ok_idle &= f["idle"] == 0
        ok_missed &= missed == 0
        print(f"{r['n']:>5} | {pp(col(s, 'register')):>16} | {pp(col(s, 'routed')):>14} | {pp(col(s, 'deregister')):>18} | "
              f"{pp(col(s, 'unrouted')):>16} | {f['idle']:>11.0f} | {fmt(f['cpu_per_event'], '12.2f')} | "
              f"{fmt(f['net_per_event'], '11.2f')} | {f['cpu_per_container']:>12.2f} | {missed}"
              + (f" (+{len(r['exited_early'])} exited early)" if r.get("exited_early") else ""))
    print("(ms; register/routed from the start event, deregister/unrouted from the kill event; "
          "CPU: wayfinder without its lb-proxy threads over the start and stop phases, per Docker event it counted; "
          "net of idle: less what it spends idle over as long, resyncs included)")
    print(f"machine: nproc={nproc}; commit {commit}")
    if largest is None:
        return
    p99 = pct(col(largest["samples"], "routed"), 99)
    at500 = largest["n"] >= 500
    ok_p99 = p99 is not None and p99 < 1000 and sum(per_round(largest)["missed"].values()) == 0
    print(f"target: p99 start event -> routed < 1 s at 500 containers: "
          + (f"{'met' if ok_p99 else 'MISSED'} (p99 {fmt(p99, '.0f')} ms at N={largest['n']})" if at500
             else f"not measured (largest N {largest['n']}: p99 {fmt(p99, '.0f')} ms)"))
    print(f"target: zero writes while idle: {'met' if ok_idle else 'MISSED'}; "
          f"every container registered, routed, deregistered and unrouted: {'yes' if ok_missed else 'NO'}")
    print("peer: none (registrator cannot be had here: no Debian package, no Docker Hub); absolute figures only")


if sys.argv[1] == "--table":
    table(sys.argv[4:], sys.argv[2], sys.argv[3])
else:
    details(sys.argv[1])
EOF

inspect_probe=""
[ "${INSPECT_PROBE:-0}" = 1 ] && inspect_probe="$tmp/d.sock"
rounds=()
for n in $sizes; do
  echo
  echo "-- round N=$n: start $n containers ($parallel commands at once), idle ${idle_periods}x${resync}s, stop and remove them"
  check_alive
  # In the background, so that a SIGTERM to this script is handled at once
  # (bash runs traps only between foreground commands); listed with the started
  # processes meanwhile, so the trap stops it first.
  python3 "$tmp/round.py" "$n" "$parallel" "$pollers" "$poll_ms" "$resync" "$idle_periods" "$phase_timeout" \
    "$p_http" "$p_lb" "$p_admin" "${pid_of[wayfinder]}" wf-bench:app "$tmp/wayfinder.log" \
    "$tmp/events-$n.jsonl" "$tmp/round-$n.json" "$inspect_probe" &
  pids+=($!)
  names+=("round-$n")
  wait "${pids[-1]}" || die "round N=$n failed"
  unset 'pids[-1]' 'names[-1]'
  python3 "$tmp/report.py" "$tmp/round-$n.json"
  rounds+=("$tmp/round-$n.json")
  remaining=$(docker ps -aq | wc -l)
  [ "$remaining" = 0 ] || die "$remaining containers left after round N=$n"
done
check_alive

echo
echo "== summary"
python3 "$tmp/report.py" --table "$(nproc)" "$commit" "${rounds[@]}"
echo
echo "register-latency: done in ${SECONDS}s"
