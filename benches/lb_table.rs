//! The cost of one routing-table build for a large catalog, without sockets.
//!
//! * `lb_table/cold`: 5,000 services x 3 instances, nothing cached: every
//!   backend made, every name formatted (the first table after a start).
//! * `lb_table/rebuild`: the same specs again with the parts of the previous
//!   build cached (`BackendCache`): what a change to one service costs the
//!   table builder, which still inserts every service's names again.
//!
//! Why: the lb builds a new table for every Consul change (benches/lb-scale.sh
//! reports the live figure as "build ms"); this isolates that step from Consul.
//!
//! Run: `cargo bench --bench lb_table` (add `-- --warm-up-time 1
//! --measurement-time 3` for a quick look).

use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use wayfinder::lb::table::{BackendCache, HealthRegistry, InstanceSpec, RoutingTable, ServiceSpec, TableConfig};
use wayfinder::lb::tags::parse_tags;

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
                    addr: SocketAddr::from(([127, 0, (s / 250) as u8, (s % 250) as u8], 8000 + i)),
                    tags: tags.clone(),
                })
                .collect(),
        })
        .collect()
}

fn table_benches(c: &mut Criterion) {
    let cfg = TableConfig {
        consul_domain: "consul".into(),
        local_datacenter: "dc1".into(),
        add_domain: Some(".apps.example.com".into()),
        landing_hosts: vec!["localhost".into()],
        policy: Default::default(),
    };
    let specs = specs(5000);
    let refs: Vec<&ServiceSpec> = specs.iter().collect();
    let health = HealthRegistry::new();
    let mut group = c.benchmark_group("lb_table");
    group.sample_size(20);
    group.bench_function("cold", |b| {
        b.iter(|| RoutingTable::build_cached(&cfg, &refs, &health, &mut BackendCache::default()))
    });
    let mut cache = BackendCache::default();
    RoutingTable::build_cached(&cfg, &refs, &health, &mut cache);
    group.bench_function("rebuild", |b| {
        b.iter(|| RoutingTable::build_cached(&cfg, &refs, &health, &mut cache))
    });
    group.finish();
}

criterion_group!(benches, table_benches);
criterion_main!(benches);
