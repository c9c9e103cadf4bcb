#!/usr/bin/env bash
# Builds the appliance image on a machine without Docker Hub, the same image as
# `docker build -f deploy/Dockerfile .` (deploy/README.md, "The image"):
#
#   1. a Debian bookworm base from the Debian archive the host uses
#      (mmdebstrap --variant=minbase: ca-certificates, nftables, libcap2-bin;
#      no docs, man pages, locales nor apt lists), `docker import`ed as
#      wayfinder-base:bookworm;
#   2. the shared stages of deploy/Dockerfile (everything after its marker
#      line, unchanged: file capabilities, user, config, HEALTHCHECK), with the
#      prebuilt binary and the host's Consul in place of its build stages.
#
#   deploy/build-image.sh                  # -> wayfinder:latest
#   deploy/build-image.sh my/wayfinder:1   # another tag
#
# Environment:
#   DOCKER_HOST     the daemon to build in (as for every docker command)
#   WAYFINDER_BIN   the binary (default target/release/wayfinder, built with
#                   `cargo build --release` when missing); stripped in a copy
#                   when it is not
#   CONSUL_BIN      Consul 1.8.7 (default: `consul` on PATH, which
#                   scripts/install-deps.sh installs)
#   MIRROR          the Debian mirror (default: the host's, from
#                   /etc/apt/sources.list.d/debian.sources)
#   WAYFINDER_BASE_CACHE  where the base's tar is kept between runs, keyed by
#                   this script's content (default /var/cache/wayfinder-image,
#                   or $TMPDIR/wayfinder-image when that is not writable);
#                   "" to build it afresh every time
#
# Needs mmdebstrap, docker and strip (scripts/install-deps.sh installs them)
# and root for mmdebstrap (its root mode), as dockerd does.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
image=${1:-wayfinder:latest}
base_image=wayfinder-base:bookworm
docker=${DOCKER:-docker}

say() { echo "build-image: $*" >&2; }
die() { say "$*"; exit 1; }
need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: run scripts/install-deps.sh ($2)"
}
need mmdebstrap mmdebstrap
need "$docker" docker.io
need strip binutils

# The binary: the prebuilt release build unless told otherwise.
if [ -n "${WAYFINDER_BIN:-}" ]; then
  bin=$WAYFINDER_BIN
  [ -x "$bin" ] || die "WAYFINDER_BIN=$bin is not an executable file"
else
  bin=$repo/target/release/wayfinder
  if [ ! -x "$bin" ]; then
    need cargo "Rust, https://rustup.rs"
    say "no $bin: cargo build --release"
    (cd "$repo" && cargo build --release --locked --bin wayfinder)
  fi
fi
consul=${CONSUL_BIN:-$(command -v consul || true)}
[ -n "$consul" ] && [ -x "$consul" ] || die "consul is not installed: run scripts/install-deps.sh (Consul 1.8.7)"
consul_version=$("$consul" version | sed -n 1p)
case $consul_version in
  "Consul v1.8.7") ;;
  *) say "warning: $consul is $consul_version, the suite runs against Consul v1.8.7" ;;
esac

mirror=${MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
[ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources: set MIRROR"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The base. Keyed by this script's content: a change here makes a new one.
key=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
cache=${WAYFINDER_BASE_CACHE-/var/cache/wayfinder-image}
if [ -n "$cache" ] && ! { mkdir -p "$cache" && [ -w "$cache" ]; } 2>/dev/null; then
  cache=${TMPDIR:-/tmp}/wayfinder-image
  mkdir -p "$cache"
fi
if [ -n "$cache" ]; then
  base_tar=$cache/base-bookworm-$key.tar
  # Older keys are older versions of this script.
  find "$cache" -maxdepth 1 -name 'base-bookworm-*.tar' ! -name "base-bookworm-$key.tar" -delete 2>/dev/null || true
else
  base_tar=$work/base.tar
fi
if [ ! -s "$base_tar" ]; then
  say "making the base with mmdebstrap from $mirror (about a minute)"
  started=$SECONDS
  # merged-usr hook: the /usr merge without the usrmerge package, which would
  # pull in perl (46 MB). path-exclude: what dpkg never unpacks (copyrights
  # kept). The apt lists and caches are dropped at the end.
  mmdebstrap --quiet --variant=minbase \
    --include=ca-certificates,nftables,libcap2-bin \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old "$1"/var/log/*.log' \
    bookworm "$work/base.tar" "$mirror" >"$work/mmdebstrap.log" 2>&1 \
    || { cat "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
  if [ "$base_tar" != "$work/base.tar" ]; then
    # Renamed into place: a concurrent run sees a whole file or none.
    mv "$work/base.tar" "$base_tar.$$"
    mv "$base_tar.$$" "$base_tar"
  fi
  say "base made in $((SECONDS - started)) s"
fi
if [ "$("$docker" image inspect -f '{{index .Config.Labels "org.wayfinder.base"}}' "$base_image" 2>/dev/null)" != "$key" ]; then
  "$docker" import -c "LABEL org.wayfinder.base=$key" -m "Debian bookworm minbase (deploy/build-image.sh)" \
    "$base_tar" "$base_image" >/dev/null
fi

# 2. The image: a context of its own (the binaries need no .dockerignore) with
# the shared stages of deploy/Dockerfile behind stages that stand in for its
# Docker Hub ones at the same paths.
ctx=$work/context
mkdir -p "$ctx/deploy"
cp "$here/appliance.toml" "$ctx/deploy/appliance.toml"
cp -r "$repo/zones" "$ctx/zones"
cp "$bin" "$ctx/wayfinder"
# Stripped unless it is (a debug build is mostly debug info).
if file_info=$(LC_ALL=C readelf -S "$ctx/wayfinder" 2>/dev/null) && grep -q '\.debug_\|\.symtab' <<<"$file_info"; then
  strip "$ctx/wayfinder"
fi
cp "$consul" "$ctx/consul"
marker='# ---- shared stages'
grep -q "^$marker" "$here/Dockerfile" || die "deploy/Dockerfile has no line starting with '$marker'"
{
  echo "# Made by deploy/build-image.sh: stand-ins for the Docker Hub stages, then"
  echo "# deploy/Dockerfile from its shared-stages marker on."
  echo "FROM $base_image AS base"
  echo "FROM $base_image AS build"
  echo "COPY wayfinder /src/target/release/wayfinder"
  echo "FROM $base_image AS consul"
  echo "COPY consul /bin/consul"
  sed -n "/^$marker/,\$p" "$here/Dockerfile"
} >"$ctx/Dockerfile"
say "building $image"
DOCKER_BUILDKIT=0 "$docker" build -q -t "$image" "$ctx" >/dev/null
"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image" | sed 's/^/build-image: built /' >&2
