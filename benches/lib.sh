# shellcheck shell=bash
# Shared helpers of the benchmark scripts in benches/. Source it, after setting
# BENCH_NAME (the prefix of every message, e.g. "lb-compare"), with
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Processes started with `start` are stopped on exit: all at once by default, or
# one by one in reverse start order when BENCH_STOP_ORDER=reverse.

: "${BENCH_NAME:?set BENCH_NAME before sourcing benches/lib.sh}"
BENCH_STOP_ORDER=${BENCH_STOP_ORDER:-parallel}
# The summaries' shared python helpers (benchstats.py) import from here.
PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
tmp=""
pids=()
names=()
declare -gA pid_of=()

# Prints the "machine:" header line (CPU count, kernel, CPU model).
print_machine() {
  echo "machine:  nproc=$(nproc) kernel=$(uname -r) $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
}

# Runs its arguments as root (directly when already root, else with sudo).
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_install_missing PKG...: installs the Debian packages not yet installed, with their services kept from starting.
apt_install_missing() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  echo "$BENCH_NAME: installing ${missing[*]}"
  # The haproxy and nginx packages ship services: they must not start (a system
  # nginx would take port 80); the benchmarks run their own instances on free ports.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    made_policy=1
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ $made_policy = 1 ]; then as_root rm -f "$policy"; fi
}

# build_wayfinder REPO [PROFILE]: builds the wayfinder binary with the cargo profile
# PROFILE (release, the default, for speed; profiling for perf and callgrind: the
# release code with its symbols and debug info, see Cargo.toml) and sets $wayfinder
# to its path, target/PROFILE/wayfinder.
# WAYFINDER=PATH uses that binary instead, for any bench (e.g. an older build, for a
# before/after figure: `WAYFINDER=/path/to/old/wayfinder benches/lb-instructions.sh`).
build_wayfinder() {
  local profile=${2:-release}
  if [ -n "${WAYFINDER:-}" ]; then
    wayfinder=$WAYFINDER
  else
    cargo build --profile "$profile" --bin wayfinder
    wayfinder="${CARGO_TARGET_DIR:-$1/target}/$profile/wayfinder"
  fi
  [ -x "$wayfinder" ] || { echo "$BENCH_NAME: $wayfinder was not built" >&2; exit 1; }
}

# build_uring_tcp REPO: builds benches/uring_tcp.rs (the io_uring TCP proxy
# prototype, bench profile) and sets $uring_tcp to its path.
build_uring_tcp() {
  uring_tcp=$(cd "$1" && cargo bench --bench uring_tcp --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "uring_tcp" and m.get("executable"):
        print(m["executable"])')
  [ -x "$uring_tcp" ] || { echo "$BENCH_NAME: benches/uring_tcp.rs was not built (cargo bench --bench uring_tcp --no-run)" >&2; exit 1; }
}

# Creates the temp dir $tmp and installs the traps that stop every started process and remove it.
setup_tmp() {
  tmp=$(mktemp -d -t "wayfinder-$BENCH_NAME.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# EXIT trap: stops the started processes (see BENCH_STOP_ORDER), removes $tmp unless KEEP_TMP=1.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i
  if [ "$BENCH_STOP_ORDER" = reverse ]; then
    # Stop in reverse start order, so Wayfinder can still deregister itself from
    # Consul before Consul goes; each gets 5 s after SIGTERM, then SIGKILL.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
      kill -TERM "${pids[$i]}" 2>/dev/null || true
      for _ in $(seq 50); do
        kill -0 "${pids[$i]}" 2>/dev/null || break
        sleep 0.1
      done
      kill -KILL "${pids[$i]}" 2>/dev/null || true
      wait "${pids[$i]}" 2>/dev/null || true
    done
  else
    for i in "${!pids[@]}"; do
      kill -TERM "${pids[$i]}" 2>/dev/null || true
    done
    for _ in $(seq 50); do
      local alive=0
      for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null && alive=1
      done
      [ $alive = 0 ] && break
      sleep 0.1
    done
    for i in "${!pids[@]}"; do
      kill -KILL "${pids[$i]}" 2>/dev/null || true
      wait "${pids[$i]}" 2>/dev/null || true
    done
  fi
  # A script's own cleanup (e.g. removing cgroups), once its processes are gone.
  if declare -F bench_cleanup_hook >/dev/null; then bench_cleanup_hook || true; fi
  if [ -n "$tmp" ]; then
    if [ "${KEEP_TMP:-0}" = 1 ]; then
      echo "$BENCH_NAME: kept $tmp"
    else
      rm -rf "$tmp"
    fi
  fi
  exit "$status"
}

# die MESSAGE: reports the failure with the tail of every log in $tmp and exits 1.
die() {
  echo "$BENCH_NAME: FAILED: $*" >&2
  local log
  for log in "$tmp"/*.log; do
    [ -e "$log" ] || continue
    echo "--- last lines of $log" >&2
    tail -n 15 "$log" >&2 || true
  done
  exit 1
}

# start NAME CMD...: runs CMD in the background, logging to $tmp/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
  # shellcheck disable=SC2034 # pid_of is read by the scripts
  pid_of[$name]=$!
}

# Fails when any started process has exited.
check_alive() {
  local i
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || die "${names[$i]} exited (see $tmp/${names[$i]}.log)"
  done
}

# free_ports N: prints N distinct random ports free on 127.0.0.1 for both UDP and TCP.
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
ports = set()
while len(ports) < n:
    p = random.randint(20000, 60000)
    if p in ports:
        continue
    try:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_INET, kind)
            s.bind(("127.0.0.1", p))
            s.close()
    except OSError:
        continue
    ports.add(p)
print(*ports)
EOF
}

# start_consul HTTP DNS GRPC SERF_LAN SERF_WAN SERVER [HCL...]: starts a Consul dev agent on those ports and waits for its leader.
start_consul() {
  local http=$1 dns=$2 grpc=$3 serf_lan=$4 serf_wan=$5 server=$6
  shift 6
  local hcl=() h
  for h in "$@"; do hcl+=(-hcl "$h"); done
  start consul consul agent -dev -bind 127.0.0.1 -client 127.0.0.1 \
    -http-port "$http" -dns-port "$dns" -grpc-port "$grpc" \
    -serf-lan-port "$serf_lan" -serf-wan-port "$serf_wan" -server-port "$server" \
    "${hcl[@]}"
  local leader=""
  for _ in $(seq 150); do
    check_alive
    leader=$(curl -s --max-time 1 "http://127.0.0.1:$http/v1/status/leader" || true)
    [[ "$leader" =~ ^\"[^\"]+\"$ ]] && break
    sleep 0.2
  done
  [[ "$leader" =~ ^\"[^\"]+\"$ ]] || die "consul has no leader after 30 s"
}

# write_lb_config CONSUL_HTTP CONSUL_DNS LB_HTTP: writes $tmp/wayfinder.toml for `wayfinder lb` and checks it.
write_lb_config() {
  cat >"$tmp/wayfinder.toml" <<EOF
[consul]
http = "127.0.0.1:$1"
dns = ["127.0.0.1:$2"]

[dns]
upstreams = ["127.0.0.1:9"]
zones_dir = "$tmp/nozones"

[lb]
http = "127.0.0.1:$3"
stats = ""
EOF
  "$wayfinder" check -c "$tmp/wayfinder.toml" >"$tmp/wayfinder-check.log" 2>&1 \
    || die "wayfinder config is invalid: $(cat "$tmp/wayfinder-check.log")"
}

# start_backends NGINX PORT1 PORT2: two nginx backends b1 and b2 (one worker each)
# answering `200 ok` with an X-Backend header, started as backend-b1/backend-b2.
# keepalive_requests is raised so that no side closes a keep-alive connection
# every 1000 requests (nginx's default), which would charge reconnects to
# whichever proxy happens to be in front.
start_backends() {
  local nginx_bin=$1 b port
  shift
  for b in b1 b2; do
    port=$1
    shift
    mkdir -p "$tmp/$b/logs"
    cat >"$tmp/$b/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $tmp/$b/nginx.pid;
error_log $tmp/$b/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {
    listen 127.0.0.1:$port backlog=1024;
    location / {
      default_type text/plain;
      add_header X-Backend $b always;
      return 200 "ok\n";
    }
  }
}
EOF
    "$nginx_bin" -t -q -p "$tmp/$b/" -c "$tmp/$b/nginx.conf" 2>"$tmp/$b-check.log" \
      || die "backend $b nginx config is invalid: $(cat "$tmp/$b-check.log")"
    start "backend-$b" "$nginx_bin" -p "$tmp/$b/" -c "$tmp/$b/nginx.conf"
  done
}

# write_haproxy_config HAPROXY PORT BACKEND1 BACKEND2: $tmp/haproxy.cfg, HAProxy
# configured as PanteraS ran it and as Wayfinder works (one thread, Host routing
# of web.service, round-robin over both backends with maxconn 128 and weight
# 100, X-Forwarded-For/-Proto and X-Unique-ID added), then checked.
write_haproxy_config() {
  cat >"$tmp/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  option forwardfor
  unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
  unique-id-header X-Unique-ID

frontend http
  bind 127.0.0.1:$2
  http-request set-header X-Forwarded-Proto http
  acl host_web hdr(host) -i web.service
  use_backend web if host_web

backend web
  balance roundrobin
  http-reuse always
  server s1 127.0.0.1:$3 maxconn 128 weight 100
  server s2 127.0.0.1:$4 maxconn 128 weight 100
EOF
  "$1" -c -q -f "$tmp/haproxy.cfg" >"$tmp/haproxy-check.log" 2>&1 \
    || die "haproxy config is invalid: $(cat "$tmp/haproxy-check.log")"
}

# write_nginx_proxy_config NGINX PORT BACKEND1 BACKEND2: $tmp/proxy/nginx.conf, an
# nginx reverse proxy (one worker) configured as Wayfinder works: Host routing of
# web.service over both backends (weight 100, max_conns 128, keep-alive pool of
# 64), Host forwarded, X-Forwarded-For/-Proto and X-Unique-ID added, 503 for any
# other Host; then checked. Start it with `start nginx NGINX -p $tmp/proxy/ -c $tmp/proxy/nginx.conf`.
write_nginx_proxy_config() {
  mkdir -p "$tmp/proxy/logs"
  cat >"$tmp/proxy/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $tmp/proxy/nginx.pid;
error_log $tmp/proxy/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  upstream web {
    server 127.0.0.1:$3 weight=100 max_conns=128;
    server 127.0.0.1:$4 weight=100 max_conns=128;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$2 backlog=1024;
    server_name web.service;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Unique-ID \$request_id;
    }
  }
  server {
    listen 127.0.0.1:$2 default_server;
    return 503;
  }
}
EOF
  "$1" -t -q -p "$tmp/proxy/" -c "$tmp/proxy/nginx.conf" 2>"$tmp/nginx-check.log" \
    || die "nginx proxy config is invalid: $(cat "$tmp/nginx-check.log")"
}

# PIDs of an instance: the started process and all its descendants (from the
# parent links in `ps`: /proc/PID/task/*/children needs CONFIG_PROC_CHILDREN).
tree_pids() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END {
      inside[root] = 1
      do {
        grew = 0
        for (p in parent) if (!(p in inside) && (parent[p] in inside)) { inside[p] = 1; grew = 1 }
      } while (grew)
      for (p in inside) print p
    }'
}
# CPU ticks (utime + stime + cutime + cstime, all threads) of a list of PIDs.
cpu_ticks() {
  local p
  for p in "$@"; do
    # Field 2 (comm) may hold spaces: count from the closing parenthesis.
    sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 + $14 + $15 }' || true
  done | awk '{ s += $1 } END { print s + 0 }'
}


# expect_both NAME PORT [CURL_OPTION...]: waits until the proxy NAME on 127.0.0.1:PORT
# answers 8 fresh `Host: web.service` requests with 200 "ok", both backends seen
# (each backend adds `X-Backend: b1|b2`); fails otherwise. CURL_OPTIONs (e.g. -k and
# an https URL scheme via EXPECT_SCHEME) go to every curl.
expect_both() { # name port [curl options...]
  local p=$1 pport=$2 got seen
  shift 2
  for _ in $(seq 100); do
    check_alive
    seen=""
    local ok=1
    for _ in 1 2 3 4 5 6 7 8; do
      got=$(curl -s --max-time 2 "$@" -D - -H 'Host: web.service' "${EXPECT_SCHEME:-http}://127.0.0.1:$pport/" 2>/dev/null | tr -d '\r' || true)
      if ! grep -qE '^HTTP/(1.1|2) 200' <<<"$got" || [ "$(tail -n 1 <<<"$got")" != ok ]; then
        ok=0
        break
      fi
      seen+=" $(awk -F': ' 'tolower($1) == "x-backend" {print $2}' <<<"$got")"
    done
    if [ $ok = 1 ] && grep -q b1 <<<"$seen" && grep -q b2 <<<"$seen"; then
      echo "verified: $p (port $pport) answers 200 ok from both backends:$seen"
      return 0
    fi
    sleep 0.2
  done
  die "$p (port $pport) does not answer 200 ok from both backends (last: $(head -c 300 <<<"${got:-nothing}"))"
}
