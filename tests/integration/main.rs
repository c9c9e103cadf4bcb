//! Wayfinder's integration tests, one binary (see harness.rs for the real
//! components they run against).

mod docker; // a private dockerd per test (own bridge, subnet, cgroups, directory) and a busybox app image, for the register tests
mod harness;
mod netns; // network namespaces, veth links and a wireguard-go peer for the vpn tests

mod circles; // src/ has no new file-level import circles (reads the sources; nothing runs)
mod cli; // black-box: the built binary, its exit codes, signals
mod compose; // deploy/docker-compose.yml with compose v1 and v2 in a namespace: healthy, registered, vpn, HEALTHCHECK, stop, state; --env-file
mod consul_view; // the one Consul view at scale (default limits): 1000 services, bounded connections, every change, restarts
mod containers; // client containers on the default bridge and a user network reach the appliance (shipped appliance.toml) by every presented name and URL
mod deploy; // deploy/ files as fixtures: systemd unit, Dockerfile, compose, restricted/host, Marathon, *.toml
mod dns_consul; // *.consul forwarded to a real Consul agent: freshness, failover, truncation
mod dns_inline; // Consul asked from the UDP worker's own loop: many at once, 0x20 kept, its table's limit, late and forged answers
mod dns_local; // wildcard LB domain and zones_dir zones: AA, reloads, broken files
mod dns_robustness; // malformed packets over UDP and TCP never hurt the server
mod dns_trust; // attacks refused: spoofed upstream answers, ICMP errors, forwarding and TCP limits
mod dns_upstream; // the cache in front of the upstream resolvers: TTLs, negatives, stale
mod image; // deploy/build-image.sh in a private dockerd: the offline image build, its user, capabilities, consul inside, size
mod lb; // the load balancer against real Consul and HTTP backends
mod lb_bounds; // what clients can hold: connections per source and in total, h2 timeouts, stalled readers, the maxconn queue
mod lb_h1; // the own HTTP/1.1 path at its edges with raw clients and backends: strict framing, chunked and long bodies, 100-continue, pooled closes, pipelining, HTTP/1.0, answer framings, 502
mod lb_requests; // what one client's requests can make the lb do: slow bodies and slots, per-client share, body memory, Host, forwarding headers
mod lb_tls; // HTTPS by SNI, HTTP/2, certificate reload; the stats listener
mod lb_trust; // what a Consul registration can make the lb reach: own listeners, ports, networks, names
mod operator; // issue 22: the status page's live charts in Chromium under traffic, the token over them, deploy/grafana against a live /metrics, `wayfinder top` in tmux
mod quick_start; // the README's vpn quick start in a fresh clone, in a namespace: dig, lb, a wireguard-go laptop
mod register; // the register component against a private dockerd and Consul: registered, routed, drained, restarted, hostile input
mod supervisor; // `up` in-process: restarts, backoff, admin API, metrics, token, status page in Chromium
mod up; // black-box `wayfinder up`: its own Consul, dig + lb end to end, status, SIGTERM/SIGKILL leave nothing
mod up_cluster; // three `up` masters in network namespaces; one host cut off, the others keep answering
mod up_vpn; // `up` with the vpn in a namespace: peers through the admin API and the page, a wireguard-go laptop
mod vpn; // WireGuard against wireguard-go in namespaces: ping, DNS, HTTP, live peers, hostile input
