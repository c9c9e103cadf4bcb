#!/usr/bin/env bash
# Installs the system packages Wayfinder's tests and benchmarks need, idempotently,
# on a fresh Debian bookworm machine (see ../shared/notes/environment.md).
#
#   scripts/install-deps.sh          # what the test suite needs
#   scripts/install-deps.sh --bench  # plus the load generators and peers for benches/
#
# Consul is not in bookworm: it comes from Debian's bullseye suite, fetched with a
# private apt state so the system's sources are never touched.
set -euo pipefail

want_bench=0
[ "${1:-}" = "--bench" ] && want_bench=1

packages=(bind9-dnsutils knot-dnsutils unbound dnsmasq-base iproute2 procps ca-certificates curl nginx-light)
# The quick-start test clones the repository.
packages+=(git)
# up: the status-page test drives headless Chromium; the deploy test runs
# `systemd-analyze verify` on deploy/wayfinder.service.
packages+=(chromium systemd)
# The operator-view tests run `wayfinder top` in a real terminal.
packages+=(tmux)
# The vpn tests: wireguard-go is the laptop, ping goes through the tunnel;
# nftables: the vpn confines its peers with an nft table (and masquerades).
packages+=(wireguard-go wireguard-tools iputils-ping nftables)
# The register tests run their own dockerd (tests/integration/docker.rs: no
# system daemon, no registry) and build their app images from busybox-static;
# the standalone quick start builds its demo image the same way, and so does
# benches/register-latency.sh (no system daemon is started: see the policy below).
packages+=(docker.io busybox-static)
# The compose test (tests/integration/compose.rs) runs deploy/docker-compose.yml
# with compose v1, Debian's `docker-compose` 1.29 (v2 below).
packages+=(docker-compose)
# The image test (tests/integration/image.rs) builds the appliance image the
# offline way, deploy/build-image.sh: mmdebstrap makes its Debian base from
# the archive (no Docker Hub), strip/readelf (binutils) strip a debug binary.
packages+=(mmdebstrap binutils)
[ $want_bench = 1 ] && packages+=(dnsperf iperf3)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  # Packages with services (unbound, docker.io's dockerd and containerd) must not
  # start them: tests and benchmarks run their own instances on free ports and
  # private sockets, and a system unbound would take port 53.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    made_policy=1
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ $made_policy = 1 ] && as_root rm -f "$policy"
fi

# A package of another Debian suite without touching the system's apt state:
# a private sources.list, lists and archives in a temporary directory; the
# package is unpacked (never installed with dpkg) and the caller copies out
# what it needs from $root, the unpacked tree.
fetched=()
trap 'rm -rf "${fetched[@]}"' EXIT
from_suite() { # SUITE PACKAGE[=VERSION]
  local suite=$1 package=$2 mirror work
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  if [ -z "$mirror" ]; then
    mirror=$(awk '/^deb / && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  [ -n "$mirror" ] || { echo "install-deps: cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources" >&2; exit 1; }
  work=$(mktemp -d)
  fetched+=("$work")
  mkdir -p "$work/lists/partial" "$work/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$work/sources.list"
  local apt_opts=(-o APT::Sandbox::User=root -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o Dir::State::Lists="$work/lists" -o Dir::Cache::Archives="$work/archives")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work" && apt-get "${apt_opts[@]}" download "$package")
  dpkg-deb -x "$work"/"${package%%=*}"_*.deb "$work/root"
  root=$work/root
}

if ! command -v consul >/dev/null 2>&1; then
  echo "install-deps: installing consul from Debian bullseye"
  from_suite bullseye consul
  as_root install -m 0755 "$root/usr/bin/consul" /usr/local/bin/consul
fi

# Compose v2 (`docker compose`), beside bookworm's v1 (`docker-compose`): the
# compose test (tests/integration/compose.rs) runs the shipped file with both.
# Bookworm has no v2; Debian trixie's docker-compose package is v2 (a Go
# binary needing only libc >= 2.34), unpacked from trixie as Consul is from
# bullseye and installed as a CLI plugin where both docker CLIs (Debian's
# 20.10 and a newer one) look. Kept once there.
compose_plugin=/usr/local/lib/docker/cli-plugins/docker-compose
if [ ! -x "$compose_plugin" ]; then
  echo "install-deps: installing compose v2 (docker compose) from Debian trixie"
  from_suite trixie docker-compose
  as_root install -D -m 0755 "$root/usr/libexec/docker/cli-plugins/docker-compose" "$compose_plugin"
fi

echo "install-deps: ok ($(consul version | head -1), $(dig -v 2>&1 | head -1), unbound $(unbound -V 2>/dev/null | awk '/^Version/ {print $2}'), $(dockerd --version))"
