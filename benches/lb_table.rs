//! What the lb's routing table costs, without sockets.
//!
//! * `lb_table/cold`: one full build of 5,000 services x 3 instances, nothing
//!   cached: every backend made, every name formatted (the first table after a
//!   start).
//! * `lb_change/{add_instance,weight}/N`: ONE service changing in a catalog of N
//!   services x 3 (an instance added then removed, or its weight changed), for
//!   the whole per-change path of the watcher: the view's publication of its map,
//!   `lb::watch::Feed` taking the picture, building the next table, swapping it
//!   and letting the carryover forget what left. N = 5,000 (what the lb is
//!   meant for) and 50,000 (10x that). Proportional to the change means the same
//!   figure at both sizes.
//! * `lb_route/{host,path}/N`: one `RoutingTable::route` (the request hot path)
//!   in a table of N services, Host names spread over the whole table (so the
//!   lookups miss the CPU caches as real traffic does), and a path route.
//!
//! Why: the lb applies every Consul change (benches/lb-scale.sh reports the live
//! figure as "build ms"); this isolates that step from Consul, and checks that
//! the table layout that makes it cheap keeps requests cheap.
//!
//! Run: `cargo bench --bench lb_table` (add `-- --warm-up-time 1
//! --measurement-time 3` for a quick look; a group name as filter, e.g.
//! `-- lb_change`, runs one group).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use wayfinder::consul::{Health, InstanceEntry, ServiceEntry, Services};
use wayfinder::lb::LbState;
use wayfinder::lb::table::{Carryover, Destination, InstanceSpec, RoutingTable, ServiceSpec, TableConfig};
use wayfinder::lb::tags::parse_tags;
use wayfinder::lb::watch::Feed;

const SIZES: [usize; 2] = [5_000, 50_000];

fn cfg() -> TableConfig {
    TableConfig {
        consul_domain: "consul".into(),
        local_datacenter: "dc1".into(),
        add_domain: Some(".apps.example.com".into()),
        landing_hosts: vec!["localhost".into()],
        policy: Default::default(),
    }
}

/// The address of instance `i` of service `s` (distinct for every instance).
fn addr(s: usize, i: u16) -> SocketAddr {
    SocketAddr::from((
        [127, (s / 62_500) as u8, (s / 250 % 250) as u8, (s % 250) as u8],
        8000 + i,
    ))
}

fn specs(n: usize) -> Vec<ServiceSpec> {
    let (tags, _) = parse_tags(&["haproxy".to_string(), "haproxy_weight=1".to_string()]);
    (0..n)
        .map(|s| ServiceSpec {
            name: format!("svc-{s}"),
            datacenter: "dc1".into(),
            instances: (0..3u16)
                .map(|i| InstanceSpec {
                    id: format!("svc-{s}-{i}"),
                    node: format!("node-{i}"),
                    addr: addr(s, i),
                    tags: tags.clone(),
                })
                .collect(),
        })
        .collect()
}

/// Service `s` as the Consul view holds it: `instances` passing instances
/// tagged `haproxy` with weight `weight`.
fn entry(s: usize, instances: u16, weight: u16) -> Arc<ServiceEntry> {
    let tags = vec!["haproxy".to_string(), format!("haproxy_weight={weight}")];
    let instances = (0..instances)
        .map(|i| {
            let a = addr(s, i);
            InstanceEntry {
                id: format!("svc-{s}-{i}"),
                node: format!("node-{i}"),
                address: a.ip().to_string(),
                port: a.port(),
                tags: tags.clone(),
                health: Health::Passing,
                modify_index: 1,
                checks: Default::default(),
            }
        })
        .collect();
    Arc::new(ServiceEntry {
        name: format!("svc-{s}"),
        tags,
        instances,
    })
}

fn catalog(n: usize) -> Services {
    (0..n).map(|s| (format!("svc-{s}"), entry(s, 3, 1))).collect()
}

fn table_benches(c: &mut Criterion) {
    let cfg = cfg();
    let specs = specs(5000);
    let health = Carryover::new();
    let mut group = c.benchmark_group("lb_table");
    group.sample_size(10);
    group.bench_function("cold", |b| b.iter(|| RoutingTable::build(&cfg, &specs, &health)));
    group.finish();
}

/// One service of a catalog of `n` flipping between two versions, through the
/// watcher's whole per-change path.
fn change_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb_change");
    group.sample_size(10);
    for n in SIZES {
        let mut services = catalog(n);
        let state = LbState::new(&cfg());
        let mut feed = Feed::new(cfg());
        feed.catalog(&services);
        feed.publish(&state);
        let changed = n / 3;
        let name = format!("svc-{changed}");
        type Variant = fn(usize) -> [Arc<ServiceEntry>; 2];
        let variants: [(&str, Variant); 2] = [
            ("add_instance", |s| [entry(s, 4, 1), entry(s, 3, 1)]),
            ("weight", |s| [entry(s, 3, 2), entry(s, 3, 1)]),
        ];
        for (what, variant) in variants {
            let versions = variant(changed);
            let mut flip = 1usize;
            group.bench_with_input(BenchmarkId::new(what, n), &n, |b, _| {
                b.iter(|| {
                    flip ^= 1;
                    // The view's working copy changes, then it publishes its map.
                    services.insert(name.clone(), versions[flip].clone());
                    let picture = services.clone();
                    assert_eq!(feed.catalog(&picture), 1);
                    black_box(feed.publish(&state))
                })
            });
            // Back to the first version for the next variant.
            services.insert(name.clone(), entry(changed, 3, 1));
            feed.catalog(&services.clone());
            feed.publish(&state);
        }
    }
    group.finish();
}

/// `route()` on tables of each size: Host names spread over the table, and a
/// path route (the host-independent prefixes, after the Host missed).
fn route_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("lb_route");
    for n in SIZES {
        let mut specs = specs(n);
        let (routed, _) = parse_tags(&["haproxy".to_string(), "haproxy_route=/api".to_string()]);
        specs[n / 2].instances[0].tags = routed;
        let (table, _) = RoutingTable::build(&cfg(), &specs, &Carryover::new());
        // A fixed spread of names over the whole table (a multiplicative step).
        let hosts: Vec<String> = (0..4096)
            .map(|i| format!("svc-{}.service.consul", (i * 7919) % n))
            .collect();
        let found = |host: &str, path: &str| matches!(table.route(Some(host), path), Destination::Backend(_));
        assert!(hosts.iter().all(|h| found(h, "/")) && found("unknown.example.com", "/api/v1/items"));
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::new("host", n), &n, |b, _| {
            b.iter(|| {
                next = (next + 1) % hosts.len();
                found(black_box(&hosts[next]), "/index.html")
            })
        });
        group.bench_with_input(BenchmarkId::new("path", n), &n, |b, _| {
            b.iter(|| found(black_box("unknown.example.com"), "/api/v1/items"))
        });
    }
    group.finish();
}

criterion_group!(benches, table_benches, change_benches, route_benches);
criterion_main!(benches);
