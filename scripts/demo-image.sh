#!/usr/bin/env bash
# Builds the demo app image `wayfinder/demo` (or $1) in the Docker daemon that
# DOCKER_HOST names, without any registry: a busybox-static root file system
# imported with `docker import` (about 2 MB, a second). The app answers HTTP on
# $PORT (default 8080) with "hello from <container host name>", serves
# /health while /www/health exists (`docker exec C rm /www/health` makes a
# HEALTHCHECK fail), and on SIGTERM keeps serving for $DRAIN_SECONDS (default
# 0) before it exits 0, as a well-behaved app drains.
#
#   scripts/demo-image.sh                 # wayfinder/demo, if it is not there yet
#   FORCE=1 scripts/demo-image.sh my/app  # rebuild under another name
set -euo pipefail

image=${1:-wayfinder/demo}
docker=${DOCKER:-docker}
if [ -z "${FORCE:-}" ] && "$docker" image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
busybox=/bin/busybox   # busybox-static: no library needed inside the image
[ -x "$busybox" ] || { echo "demo-image: busybox is not installed: run scripts/install-deps.sh (busybox-static)" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/www" "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in sh httpd wget sleep cat echo kill hostname rm touch ls ps; do
  ln -s busybox "$root/bin/$applet"
done
cat >"$root/app" <<'APP'
#!/bin/sh
# The demo app: HTTP on $PORT, a health file, a drain on SIGTERM.
port=${PORT:-8080}
echo "hello from $(hostname)" > /www/index.html
touch /www/health
httpd -f -p "$port" -h /www &
server=$!
stop() {
  sleep "${DRAIN_SECONDS:-0}"
  kill "$server" 2>/dev/null
  exit 0
}
trap stop TERM INT
wait "$server"
APP
chmod 0755 "$root/app"
tar -C "$root" -c . | "$docker" import \
  -c 'ENTRYPOINT ["/app"]' -c 'EXPOSE 8080' -c 'ENV PATH=/bin' \
  -m "wayfinder demo app (busybox-static)" - "$image" >/dev/null
echo "demo-image: built $image"
