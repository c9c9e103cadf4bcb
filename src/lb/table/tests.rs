//! Tests of the routing table: lookups, compilation, conflicts, the pick and
//! what the carryover keeps.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;
use crate::lb::policy::{RefusalReason, Refused};
use crate::lb::tags;

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], port))
}

fn inst(last: u8, tag_list: &[&str]) -> InstanceSpec {
    let (parsed, warnings) = tags::parse_tags(&tag_list.iter().map(|t| t.to_string()).collect::<Vec<_>>());
    assert!(warnings.is_empty(), "{warnings:?}");
    InstanceSpec {
        id: format!("i{last}"),
        node: format!("node{last}"),
        addr: addr(last, 8080),
        tags: parsed,
    }
}

/// A spec of `name` in `dc` (also used by `delta`'s tests).
pub(super) fn spec(name: &str, dc: &str, instances: Vec<InstanceSpec>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        datacenter: dc.into(),
        instances,
    }
}

fn cfg() -> TableConfig {
    TableConfig {
        consul_domain: "consul".into(),
        local_datacenter: "dc1".into(),
        add_domain: Some(".apps.example.com".into()),
        landing_hosts: vec!["localhost".into(), "10.0.0.5".into(), "Host1.".into(), "[::1]".into()],
        policy: Default::default(),
    }
}

fn build_with(cfg: &TableConfig, specs: &[ServiceSpec]) -> (RoutingTable, Vec<String>) {
    RoutingTable::build(cfg, specs, &Carryover::new())
}

fn build(specs: &[ServiceSpec]) -> RoutingTable {
    let (table, warnings) = build_with(&cfg(), specs);
    assert!(warnings.is_empty(), "{warnings:?}");
    table
}

/// The routing decision as `service@dc`, `landing` or `none`.
fn to(table: &RoutingTable, host: Option<&str>, path: &str) -> String {
    match table.route(host, path) {
        Destination::Backend(b) | Destination::OtherDatacenter(Some(b)) => format!("{}@{}", b.service, b.datacenter),
        Destination::OtherDatacenter(None) => "none".into(),
        Destination::Landing => "landing".into(),
        Destination::NotFound => "none".into(),
    }
}

fn web() -> ServiceSpec {
    spec("web", "dc1", vec![inst(1, &["haproxy"])])
}

/// Destination counters are bounded: routes no table has any more go at once
/// when they never served a request, and the others are kept up to
/// MAX_RETIRED_ROUTES; reading a total creates nothing.
#[test]
fn route_counters_of_gone_and_made_up_routes_are_pruned() {
    let health = Carryover::new();
    // Made-up other-datacenter names that were watched and never served.
    for i in 0..5000 {
        let _ = health.route_counters(&format!("madeup{i}"), "dc2");
    }
    assert_eq!(health.route_total("nobody", "dc9"), None);
    // Routes that served before they went away.
    for i in 0..(MAX_RETIRED_ROUTES + 100) {
        health
            .route_counters(&format!("gone{i}"), "dc1")
            .record(200, std::time::Duration::ZERO);
    }
    let live = health.route_counters("web", "dc1");
    live.record(200, std::time::Duration::ZERO);
    let _ = health.route_counters("quiet", "dc1");
    health.retain_routes([("web", "dc1"), ("quiet", "dc1")]);
    assert_eq!(
        health.route_count(),
        2 + MAX_RETIRED_ROUTES,
        "live ones plus the retired bound"
    );
    assert_eq!(
        health.route_total("web", "dc1"),
        Some(1),
        "live counters are kept as they are"
    );
    assert_eq!(
        health.route_total("quiet", "dc1"),
        Some(0),
        "live routes stay even unused"
    );
    assert_eq!(health.route_total("madeup1", "dc2"), None);
    // The same counters come back for a live route (monotonic for scrapers).
    assert!(Arc::ptr_eq(&live, &health.route_counters("web", "dc1")));
    health.retain_routes([]);
    assert_eq!(health.route_count(), MAX_RETIRED_ROUTES);
}

/// The delta's version of the same bound: routes that leave go at once
/// when they never served, the others are kept up to MAX_RETIRED_ROUTES
/// (oldest out first), a route that comes back is live again, and the
/// queue of retired routes stays bounded however often routes come and go.
#[test]
fn retired_routes_are_bounded_by_delta_too() {
    let health = Carryover::new();
    let _ = health.route_counters("quiet", "dc1");
    health.retire_routes([("quiet", "dc1")], []);
    assert_eq!(health.route_count(), 0, "never served: gone at once");
    let names: Vec<String> = (0..MAX_RETIRED_ROUTES + 100).map(|i| format!("gone{i}")).collect();
    for n in &names {
        health.route_counters(n, "dc1").record(200, std::time::Duration::ZERO);
    }
    health.retire_routes(names.iter().map(|n| (n.as_str(), "dc1")), []);
    assert_eq!(health.route_count(), MAX_RETIRED_ROUTES);
    assert_eq!(health.route_total("gone0", "dc1"), None, "the oldest went first");
    assert_eq!(health.route_total("gone100", "dc1"), Some(1));
    // Back in a table: live, and no longer counted against the bound.
    health.retire_routes([], [("gone100", "dc1")]);
    let more: Vec<String> = (0..10).map(|i| format!("more{i}")).collect();
    for n in &more {
        health.route_counters(n, "dc1").record(200, std::time::Duration::ZERO);
    }
    health.retire_routes(more.iter().map(|n| (n.as_str(), "dc1")), []);
    assert_eq!(
        health.route_total("gone100", "dc1"),
        Some(1),
        "live routes are never evicted"
    );
    assert_eq!(health.route_count(), MAX_RETIRED_ROUTES + 1);
    // A route flapping in and out many times leaves the bookkeeping bounded.
    for _ in 0..10 * MAX_RETIRED_ROUTES {
        health.retire_routes([("gone100", "dc1")], []);
        health.retire_routes([], [("gone100", "dc1")]);
    }
    let book = health.routes.lock();
    assert!(
        book.retired.len() <= 2 * MAX_RETIRED_ROUTES + 64,
        "{}",
        book.retired.len()
    );
    assert_eq!(book.retired_count, MAX_RETIRED_ROUTES - 1, "gone100 is live again");
}

#[test]
fn local_service_host_forms() {
    let t = build(&[web()]);
    for host in [
        "web.service",
        "web.service.consul",
        "web.service.dc1.consul",
        "web.apps.example.com",
        "WEB.Service.Consul",
        "web.service.consul.",
        "web.service.consul:80",
        "Web.Service.DC1.Consul.:8080",
        " web.apps.example.com ",
    ] {
        assert_eq!(to(&t, Some(host), "/"), "web@dc1", "{host}");
    }
    for host in [
        "web",
        "web.consul",
        "xweb.service.consul",
        "web.service.consul.evil.com",
        "web.apps.example.org",
        "",
    ] {
        assert_eq!(to(&t, Some(host), "/"), "none", "{host}");
    }
    assert_eq!(to(&t, None, "/"), "none");
}

/// A table config whose policy knows an admin listener on 127.0.0.1:9090.
fn guarded() -> TableConfig {
    let mut c = cfg();
    c.policy.own.add("admin", "127.0.0.1:9090".parse().unwrap());
    c
}

fn at(mut i: InstanceSpec, addr: &str) -> InstanceSpec {
    i.addr = addr.parse().unwrap();
    i
}

#[test]
fn instances_at_own_listeners_are_refused_and_reported() {
    let c = guarded();
    let specs = [spec(
        "x",
        "dc1",
        vec![at(inst(1, &["haproxy"]), "127.0.0.1:9090"), inst(2, &["haproxy"])],
    )];
    let (t, warnings) = build_with(&c, &specs);
    let b = t.backends().next().expect("the other instance still routes");
    assert_eq!(b.instances.len(), 1);
    assert_eq!(b.instances[0].addr, addr(2, 8080));
    let refused: Vec<&Refused> = t.refused().collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].reason, RefusalReason::OwnListener { listener: "admin" });
    assert_eq!(refused[0].instance.as_deref(), Some("i1"));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("admin"), "{warnings:?}");

    // Only instance: no route at all (a 503 from the lb, never the admin page).
    let (t, _) = build_with(&c, &[spec("x", "dc1", vec![at(inst(1, &["haproxy"]), "0.0.0.0:9090")])]);
    assert_eq!(t.backends().count(), 0);
    assert_eq!(to(&t, Some("x.service.consul"), "/"), "none");
}

#[test]
fn tcp_ports_outside_the_range_or_owned_are_not_opened() {
    let mut c = guarded();
    c.policy.own.add("dns", "0.0.0.0:5353".parse().unwrap());
    let specs = [
        spec("a", "dc1", vec![inst(1, &["haproxy_tcp=1"])]),
        spec("b", "dc1", vec![inst(2, &["haproxy_tcp=5353"])]),
        spec("c", "dc1", vec![inst(3, &["haproxy_tcp=5000"])]),
    ];
    let (t, _) = build_with(&c, &specs);
    let ports: Vec<u16> = t.tcp_ports().map(|(p, _)| p).collect();
    assert_eq!(ports, vec![5000]);
    let reasons: Vec<_> = t.refused().map(|r| (r.port, r.reason.clone())).collect();
    assert_eq!(
        reasons,
        vec![
            (Some(1), RefusalReason::PortNotAllowed),
            (Some(5353), RefusalReason::PortTaken { listener: "dns" })
        ]
    );
    // Configured: a privileged port is taken.
    c.policy.tcp_ports = super::super::policy::PortRanges::parse(&["1".into()]).unwrap();
    let (t, _) = build_with(&c, &specs[..1]);
    assert_eq!(t.tcp_ports().map(|(p, _)| p).collect::<Vec<_>>(), vec![1]);
}

#[test]
fn instances_at_the_lbs_own_tcp_listeners_are_refused() {
    // b's instance on a local address and a's listener port would splice
    // the lb to itself without end.
    let c = guarded();
    let specs = [
        spec("a", "dc1", vec![inst(1, &["haproxy_tcp=5000"])]),
        spec("b", "dc1", vec![at(inst(2, &["haproxy"]), "127.0.0.1:5000")]),
    ];
    let health = Carryover::new();
    let mut state = TableState::new(c);
    for s in &specs {
        state.set(s.clone());
    }
    state.apply(&health);
    let t = state.table();
    let refused: Vec<&Refused> = t.refused().collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].reason, RefusalReason::OwnTcpListener);
    // a's port goes away: b is taken again (the compiled part is not reused).
    state.remove("a", "dc1");
    assert!(state.apply(&health).full, "the listener ports moved: a full build");
    let t = state.table();
    assert_eq!(t.refused().count(), 0);
    assert_eq!(to(t, Some("b.service.consul"), "/"), "b@dc1");
}

#[test]
fn names_that_are_not_dns_labels_are_refused() {
    let specs = [
        spec("../admin", "dc1", vec![inst(1, &["haproxy"])]),
        spec("a?b", "dc1", vec![inst(2, &["haproxy_tcp=5000"])]),
        web(),
    ];
    let (t, warnings) = build_with(&cfg(), &specs);
    assert_eq!(t.backends().count(), 1);
    assert_eq!(t.tcp_ports().count(), 0);
    assert_eq!(t.refused().count(), 2);
    assert!(t.refused().all(|r| r.reason == RefusalReason::Name));
    assert_eq!(warnings.len(), 2);
    // Host names that would carry such a name into a Consul query.
    assert_eq!(other_datacenter_name("a?b.service.dc2.consul", ".consul"), None);
    assert_eq!(other_datacenter_name("web.service.d#c.consul", ".consul"), None);
    assert_eq!(
        other_datacenter_name("web.service.dc2.consul", ".consul"),
        Some(("web", "dc2"))
    );
}

#[test]
fn add_domain_is_normalised() {
    for add in [
        "apps.example.com",
        ".apps.example.com",
        ".APPS.Example.com.",
        " apps.example.com ",
    ] {
        let c = TableConfig {
            add_domain: Some(add.into()),
            ..cfg()
        };
        let (t, _) = build_with(&c, &[web()]);
        assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "web@dc1", "{add:?}");
        assert_eq!(to(&t, Some("webapps.example.com"), "/"), "none", "{add:?}");
    }
    for add in [None, Some(""), Some(".")] {
        let c = TableConfig {
            add_domain: add.map(Into::into),
            ..cfg()
        };
        let (t, _) = build_with(&c, &[web()]);
        assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "none");
        assert_eq!(
            to(&t, Some("web"), "/"),
            "none",
            "no add-domain must not mean the bare name"
        );
        assert_eq!(to(&t, Some("web.service.consul"), "/"), "web@dc1");
    }
}

#[test]
fn domain_and_datacenter_are_case_and_dot_insensitive() {
    let c = TableConfig {
        consul_domain: ".Consul.".into(),
        local_datacenter: "DC1".into(),
        ..cfg()
    };
    let (t, w) = build_with(&c, &[spec("Web", "dc1", vec![inst(1, &["haproxy"])])]);
    assert!(w.is_empty());
    assert_eq!(to(&t, Some("web.service.dc1.consul"), "/"), "Web@dc1");
    assert_eq!(to(&t, Some("web.service.consul"), "/"), "Web@dc1");
    assert_eq!(to(&t, Some("web.apps.example.com"), "/"), "Web@dc1");
}

#[test]
fn other_datacenters_and_their_fallback() {
    let t = build(&[
        web(),
        spec(
            "web",
            "DC2",
            vec![inst(21, &["haproxy", "haproxy_route=/remote", "haproxy_tcp=7000"])],
        ),
        spec("api", "dc1", vec![inst(2, &["haproxy"])]),
        spec("db", "dc2", vec![inst(22, &["haproxy"])]),
    ]);
    assert_eq!(to(&t, Some("web.service.dc2.consul"), "/"), "web@DC2");
    assert_eq!(to(&t, Some("WEB.service.dc2.consul."), "/x"), "web@DC2");
    assert_eq!(
        to(&t, Some("web.service.consul"), "/"),
        "web@dc1",
        "the plain name stays local"
    );
    assert_eq!(
        to(&t, Some("web.service.dc3.consul"), "/"),
        "web@dc1",
        "unknown dc falls back to local"
    );
    assert_eq!(
        to(&t, Some("api.service.dc2.consul"), "/"),
        "api@dc1",
        "no dc2 spec for api"
    );
    assert_eq!(to(&t, Some("db.service.dc2.consul"), "/"), "db@dc2");
    assert_eq!(
        to(&t, Some("db.service.consul"), "/"),
        "none",
        "a remote-only service has no local names"
    );
    assert_eq!(to(&t, Some("db.service.dc3.consul"), "/"), "none");
    assert_eq!(to(&t, Some("db.apps.example.com"), "/"), "none");
    // Another datacenter's routes and ports are not ours.
    assert_eq!(to(&t, Some("unknown.example.com"), "/remote"), "none");
    assert_eq!(t.tcp_ports().count(), 0);
    // Malformed variants of the pattern.
    for host in [
        "service.dc2.consul",
        ".service.dc2.consul",
        "web.service..consul",
        "web.service.dc2",
        "consul",
    ] {
        assert_eq!(to(&t, Some(host), "/"), "none", "{host}");
    }
    // A remote spec whose instances are all gone falls back to local too.
    let t = build(&[web(), spec("web", "dc2", vec![])]);
    assert_eq!(to(&t, Some("web.service.dc2.consul"), "/"), "web@dc1");
    // Fallbacks are flagged, so the proxy can ask for that datacenter.
    assert!(matches!(
        t.route(Some("web.service.dc2.consul"), "/"),
        Destination::OtherDatacenter(Some(_))
    ));
    assert!(matches!(
        t.route(Some("nope.service.dc2.consul"), "/"),
        Destination::OtherDatacenter(None)
    ));
    assert!(matches!(
        t.route(Some("web.service.consul"), "/"),
        Destination::Backend(_)
    ));
    assert_eq!(
        other_datacenter_name("web.service.dc2.consul", ".consul"),
        Some(("web", "dc2"))
    );
    assert_eq!(other_datacenter_name("web.service.consul", ".consul"), None);
}

#[test]
fn path_routes_take_the_longest_segment_prefix() {
    let t = build(&[
        spec("minions", "dc1", vec![inst(1, &["haproxy_route=/minions"])]),
        spec("admin", "dc1", vec![inst(2, &["haproxy_route=/minions/admin/"])]),
    ]);
    for (path, want) in [
        ("/minions", "minions@dc1"),
        ("/minions/", "minions@dc1"),
        ("/minions/x", "minions@dc1"),
        ("/minions/admin", "admin@dc1"),
        ("/minions/admin/x/y", "admin@dc1"),
        ("/minions/administrator", "minions@dc1"),
        ("/minionsX", "none"),
        ("/minion", "none"),
        ("/Minions", "none"),
        ("/", "none"),
        ("", "none"),
        ("minions", "none"),
        ("/caf\u{e9}/minions", "none"),
    ] {
        assert_eq!(to(&t, Some("any.example.com"), path), want, "{path:?}");
    }
    assert_eq!(
        to(&t, None, "/minions/x"),
        "minions@dc1",
        "whatever the Host, even none"
    );
    let t = build(&[
        spec("minions", "dc1", vec![inst(1, &["haproxy_route=/minions"])]),
        spec("root", "dc1", vec![inst(2, &["haproxy_route=/"])]),
    ]);
    for (path, want) in [
        ("/minionsX", "root@dc1"),
        ("/", "root@dc1"),
        ("", "root@dc1"),
        ("*", "root@dc1"),
    ] {
        assert_eq!(to(&t, Some("x"), path), want, "{path:?}");
    }
    assert_eq!(to(&t, Some("x"), "/minions/1"), "minions@dc1");
}

#[test]
fn host_beats_path_and_path_beats_landing() {
    let t = build(&[
        spec("app", "dc1", vec![inst(1, &["haproxy"])]),
        spec(
            "catch",
            "dc1",
            vec![inst(2, &["haproxy_route=/", "haproxy_route=/very/long/prefix"])],
        ),
    ]);
    assert_eq!(to(&t, Some("app.service.consul"), "/very/long/prefix/x"), "app@dc1");
    assert_eq!(to(&t, Some("other.example.com"), "/very/long/prefix/x"), "catch@dc1");
    assert_eq!(to(&t, Some("localhost"), "/"), "catch@dc1");
}

#[test]
fn landing_hosts() {
    let t = build(&[web()]);
    for host in [
        "localhost",
        "LOCALHOST:80",
        "localhost.",
        "10.0.0.5",
        "10.0.0.5:8080",
        "host1",
        "[::1]:80",
        "::1",
    ] {
        assert_eq!(to(&t, Some(host), "/anything"), "landing", "{host}");
    }
    assert_eq!(to(&t, Some("unknown.example.com"), "/"), "none");
    assert_eq!(to(&t, None, "/"), "none");
    let empty = RoutingTable::empty(&cfg());
    assert_eq!(to(&empty, Some("localhost"), "/"), "landing");
    assert_eq!(to(&empty, Some("web.service.consul"), "/"), "none");
    assert_eq!((empty.backends().count(), empty.tcp_ports().count()), (0, 0));
    // A service that claims a landing name gets it.
    let t = build(&[spec("home", "dc1", vec![inst(1, &["urlprefix-localhost/"])])]);
    assert_eq!(to(&t, Some("localhost"), "/"), "home@dc1");
}

#[test]
fn fabio_prefixes_route_by_host_and_path() {
    let t = build(&[
        spec(
            "shop",
            "dc1",
            vec![inst(
                1,
                &[
                    "urlprefix-shop.example.com/",
                    "urlprefix-api.example.com/v1",
                    "urlprefix-/static",
                ],
            )],
        ),
        spec("api", "dc1", vec![inst(2, &["urlprefix-API.example.com:443/"])]),
    ]);
    assert_eq!(to(&t, Some("Shop.Example.com"), "/cart"), "shop@dc1");
    assert_eq!(to(&t, Some("api.example.com"), "/v1/items"), "shop@dc1");
    assert_eq!(to(&t, Some("api.example.com"), "/v1"), "shop@dc1");
    assert_eq!(to(&t, Some("api.example.com"), "/v10"), "api@dc1");
    assert_eq!(to(&t, Some("api.example.com"), "/"), "api@dc1");
    assert_eq!(to(&t, Some("elsewhere.example.com"), "/static/app.js"), "shop@dc1");
    assert_eq!(to(&t, Some("elsewhere.example.com"), "/v1"), "none");
    // Fabio tags alone make an HTTP service, with its Consul names too.
    assert_eq!(to(&t, Some("shop.service.consul"), "/"), "shop@dc1");
    // A host with only a deeper prefix falls through to the path routes.
    let t = build(&[
        spec("v1", "dc1", vec![inst(1, &["urlprefix-only.example.com/v1"])]),
        spec("rest", "dc1", vec![inst(2, &["haproxy_route=/"])]),
    ]);
    assert_eq!(to(&t, Some("only.example.com"), "/v1/x"), "v1@dc1");
    assert_eq!(to(&t, Some("only.example.com"), "/v2"), "rest@dc1");
}

#[test]
fn http_membership_and_union_of_route_tags() {
    let (t, w) = build_with(
        &cfg(),
        &[spec(
            "mixed",
            "dc1",
            vec![
                inst(1, &["haproxy", "haproxy_route=/a"]),
                inst(2, &["haproxy_route=/b"]),
                inst(3, &["haproxy_tcp=9000"]),
            ],
        )],
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("disagree on haproxy_route") && w[0].contains("/a, /b"),
        "{w:?}"
    );
    let backend = t.backends().next().expect("one HTTP backend");
    let addrs: Vec<SocketAddr> = backend.instances.iter().map(|i| i.addr).collect();
    assert_eq!(
        addrs,
        [addr(1, 8080), addr(2, 8080)],
        "the TCP-only instance takes no HTTP"
    );
    assert_eq!(to(&t, None, "/a"), "mixed@dc1");
    assert_eq!(to(&t, None, "/b/c"), "mixed@dc1");
    let tcp: Vec<(u16, Vec<SocketAddr>)> = t
        .tcp_ports()
        .map(|(p, b)| (p, b.instances.iter().map(|i| i.addr).collect()))
        .collect();
    assert_eq!(tcp, [(9000, vec![addr(3, 8080)])]);
    // TCP only: no HTTP names at all.
    let t = build(&[spec("pg", "dc1", vec![inst(1, &["haproxy_tcp=5432"])])]);
    assert_eq!(to(&t, Some("pg.service.consul"), "/"), "none");
    assert_eq!(t.backends().count(), 0);
    assert_eq!(t.tcp_ports().map(|(p, _)| p).collect::<Vec<_>>(), [5432]);
    // Instances nobody asked us to balance are left out entirely.
    let t = build(&[spec("plain", "dc1", vec![inst(1, &["production"])])]);
    assert_eq!((t.backends().count(), t.tcp_ports().count()), (0, 0));
}

#[test]
fn tcp_ports_union_and_disagreement() {
    let (t, w) = build_with(
        &cfg(),
        &[
            spec(
                "db",
                "dc1",
                vec![inst(1, &["haproxy_tcp=5433"]), inst(2, &["haproxy_tcp=5432"])],
            ),
            spec(
                "cache",
                "dc1",
                vec![inst(3, &["haproxy_tcp=6379"]), inst(4, &["haproxy_tcp=6379"])],
            ),
        ],
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("'db'") && w[0].contains("5432, 5433"), "{w:?}");
    let ports: Vec<(u16, String, usize)> = t
        .tcp_ports()
        .map(|(p, b)| (p, b.service.clone(), b.instances.len()))
        .collect();
    assert_eq!(
        ports,
        [
            (5432, "db".into(), 2),
            (5433, "db".into(), 2),
            (6379, "cache".into(), 2)
        ]
    );
}

#[test]
fn all_weight_zero_still_routes_but_picks_nothing() {
    let t = build(&[spec("drain", "dc1", vec![inst(1, &["haproxy", "haproxy_weight=0"])])]);
    let Destination::Backend(backend) = t.route(Some("drain.service.consul"), "/") else {
        panic!("drained service must still route (503 from the proxy, not 'unknown host')");
    };
    assert!(backend.pick(0, &[]).is_none());
}

#[test]
fn conflicts_go_to_the_first_name_whatever_the_input_order() {
    let alpha = spec(
        "alpha",
        "dc1",
        vec![inst(
            1,
            &[
                "haproxy_route=/x",
                "haproxy_tcp=5432",
                "urlprefix-shared.example.com/",
                "urlprefix-/f",
            ],
        )],
    );
    let beta = spec(
        "beta",
        "dc1",
        vec![inst(
            2,
            &[
                "haproxy_route=/x",
                "haproxy_tcp=5432",
                "urlprefix-shared.example.com/",
                "urlprefix-/f",
            ],
        )],
    );
    let (t1, w1) = build_with(&cfg(), &[beta.clone(), alpha.clone()]);
    let (t2, w2) = build_with(&cfg(), &[alpha, beta]);
    assert_eq!(w1, w2);
    assert_eq!(w1.len(), 4, "{w1:?}");
    for w in &w1 {
        assert!(w.contains("'alpha' (dc1) and 'beta' (dc1); 'alpha' (dc1) wins"), "{w}");
    }
    assert!(w1.iter().any(|w| w.starts_with("haproxy_route /x ")), "{w1:?}");
    assert!(w1.iter().any(|w| w.starts_with("haproxy_tcp port 5432 ")), "{w1:?}");
    assert!(w1.iter().any(|w| w.starts_with("host shared.example.com ")), "{w1:?}");
    assert!(w1.iter().any(|w| w.starts_with("urlprefix-/f ")), "{w1:?}");
    for t in [&t1, &t2] {
        assert_eq!(to(t, None, "/x"), "alpha@dc1");
        assert_eq!(to(t, None, "/f"), "alpha@dc1");
        assert_eq!(to(t, Some("shared.example.com"), "/"), "alpha@dc1");
        assert_eq!(t.tcp_ports().next().map(|(_, b)| b.service.as_str()), Some("alpha"));
        assert_eq!(
            to(t, Some("beta.service.consul"), "/"),
            "beta@dc1",
            "the loser keeps its own names"
        );
        let names: Vec<&str> = t.backends().map(|b| b.service.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"]);
    }
    // Names differing only in case collide on every host name.
    let (t, w) = build_with(
        &cfg(),
        &[
            spec("web", "dc1", vec![inst(1, &["haproxy"])]),
            spec("Web", "dc1", vec![inst(2, &["haproxy"])]),
        ],
    );
    assert_eq!(w.len(), 4, "{w:?}");
    assert!(w.iter().all(|w| w.contains("'Web' (dc1) wins")), "{w:?}");
    assert_eq!(to(&t, Some("web.service.consul"), "/"), "Web@dc1");
    assert_eq!(to(&t, Some("web.service.dc9.consul"), "/"), "Web@dc1");
}

#[test]
fn one_service_claiming_a_thing_twice_is_no_conflict() {
    build(&[spec(
        "web",
        "dc1",
        vec![
            inst(
                1,
                &[
                    "haproxy",
                    "urlprefix-web.service.consul/",
                    "urlprefix-/a",
                    "haproxy_route=/a",
                ],
            ),
            inst(
                2,
                &[
                    "haproxy",
                    "urlprefix-web.service.consul/",
                    "urlprefix-/a",
                    "haproxy_route=/a",
                ],
            ),
        ],
    )]);
}

#[test]
fn duplicate_specs_are_warned() {
    let (t, w) = build_with(&cfg(), &[web(), spec("web", "DC1", vec![inst(9, &["haproxy"])])]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("listed twice"));
    assert_eq!(t.backends().count(), 1);
    assert_eq!(
        t.backends().next().map(|b| b.instances[0].addr),
        Some(addr(1, 8080)),
        "the first list is kept"
    );
}

fn backend(weights: &[u16]) -> Backend {
    let instances = weights
        .iter()
        .zip(b'a'..)
        .map(|(w, id)| BackendInstance {
            id: char::from(id).to_string(),
            node: "n".into(),
            addr: addr(id, 80),
            weight: *w,
            health: Arc::default(),
            httpchk: None,
        })
        .collect();
    Backend::new("svc".into(), "dc1".into(), instances, Arc::default())
}

/// `n` picks at `now` as instance ids, `-` for none.
fn picks(b: &Backend, n: usize, now: u64, exclude: &[SocketAddr]) -> String {
    (0..n)
        .map(|_| b.pick(now, exclude).map_or("-", |i| i.id.as_str()))
        .collect()
}

#[test]
fn smooth_wrr_matches_nginx() {
    let b = backend(&[5, 1, 1]);
    assert_eq!(picks(&b, 7, 0, &[]), "aabacaa");
    assert_eq!(picks(&b, 14, 0, &[]), "aabacaaaabacaa", "the cycle repeats exactly");
    let b = backend(&[100, 50]);
    assert_eq!(picks(&b, 6, 0, &[]), "abaaba");
    let many = picks(&b, 300, 0, &[]);
    assert_eq!((many.matches('a').count(), many.matches('b').count()), (200, 100));
    let b = backend(&[1, 1, 1]);
    assert_eq!(picks(&b, 6, 0, &[]), "abcabc");
}

#[test]
fn weight_zero_is_never_picked() {
    let b = backend(&[0, 1, 0]);
    assert_eq!(picks(&b, 5, 0, &[]), "bbbbb");
    b.instances[1].health.ejected_until_ms.store(100, Ordering::Relaxed);
    assert_eq!(picks(&b, 3, 0, &[]), "bbb", "not even as a fallback");
    assert_eq!(picks(&b, 1, 0, &[addr(b'b', 80)]), "-");
    assert_eq!(picks(&backend(&[]), 1, 0, &[]), "-");
}

#[test]
fn ejected_and_down_instances_are_skipped_until_they_recover() {
    let b = backend(&[1, 1, 1]);
    b.instances[0].health.ejected_until_ms.store(1000, Ordering::Relaxed);
    assert_eq!(picks(&b, 4, 999, &[]), "bcbc");
    assert!(
        picks(&b, 3, 1000, &[]).contains('a'),
        "back once the ejection has run out"
    );
    let b = backend(&[1, 1, 1]);
    b.instances[1].health.check_up.store(false, Ordering::Relaxed);
    assert_eq!(picks(&b, 4, 0, &[]), "acac");
    b.instances[1].health.check_up.store(true, Ordering::Relaxed);
    assert!(picks(&b, 3, 0, &[]).contains('b'));
}

#[test]
fn exclude_list_skips_tried_addresses() {
    let b = backend(&[5, 1, 1]);
    assert_eq!(picks(&b, 4, 0, &[addr(b'a', 80)]), "bcbc");
    assert_eq!(picks(&b, 2, 0, &[addr(b'a', 80), addr(b'c', 80)]), "bb");
    assert_eq!(picks(&b, 1, 0, &[addr(b'a', 80), addr(b'b', 80), addr(b'c', 80)]), "-");
}

#[test]
fn all_unavailable_falls_back_to_the_least_recently_ejected() {
    let b = backend(&[1, 1, 1]);
    for (instance, until) in b.instances.iter().zip([5000, 3000, 4000]) {
        instance.health.ejected_until_ms.store(until, Ordering::Relaxed);
    }
    assert_eq!(picks(&b, 2, 1000, &[]), "bb");
    assert_eq!(picks(&b, 1, 1000, &[addr(b'b', 80)]), "c");
    assert_eq!(picks(&b, 1, 1000, &[addr(b'b', 80), addr(b'c', 80)]), "a");
    // Failing only the active check counts as never ejected: those go first.
    b.instances[0].health.ejected_until_ms.store(0, Ordering::Relaxed);
    b.instances[0].health.check_up.store(false, Ordering::Relaxed);
    assert_eq!(picks(&b, 2, 1000, &[]), "aa");
    // All failing their check: round-robin among them, not one instance taking it all.
    let b = backend(&[1, 1]);
    for i in &b.instances {
        i.health.check_up.store(false, Ordering::Relaxed);
    }
    assert_eq!(picks(&b, 4, 0, &[]), "abab");
}

#[test]
fn eject_uses_the_carryover_clock_and_never_shortens() {
    let carryover = Carryover::new();
    let h = carryover.get(addr(1, 80));
    assert!(h.is_available(carryover.now_ms()));
    carryover.eject(&h, 60_000);
    let until = h.ejected_until_ms.load(Ordering::Relaxed);
    assert!(until >= 60_000 && !h.is_available(carryover.now_ms()));
    carryover.eject(&h, 1);
    assert_eq!(h.ejected_until_ms.load(Ordering::Relaxed), until);
    assert!(h.is_available(until));
    carryover.eject(&h, u64::MAX);
    assert_eq!(h.ejected_until_ms.load(Ordering::Relaxed), u64::MAX, "saturates");
}

#[test]
fn health_survives_rebuilds_and_retain_forgets() {
    let carryover = Carryover::new();
    let specs = [spec("web", "dc1", vec![inst(1, &["haproxy"]), inst(2, &["haproxy"])])];
    let (t1, _) = RoutingTable::build(&cfg(), &specs, &carryover);
    let (t2, _) = RoutingTable::build(&cfg(), &specs, &carryover);
    let h = |t: &RoutingTable, i: usize| {
        t.backends()
            .next()
            .map(|b| b.instances[i].health.clone())
            .expect("backend")
    };
    assert!(Arc::ptr_eq(&h(&t1, 0), &h(&t2, 0)));
    assert!(!Arc::ptr_eq(&h(&t1, 0), &h(&t1, 1)));
    assert!(Arc::ptr_eq(&h(&t1, 0), &carryover.get(addr(1, 8080))));
    // An ejection recorded through the old table is seen by the new one.
    h(&t1, 0).ejected_until_ms.store(u64::MAX, Ordering::Relaxed);
    let picked = t2.backends().next().and_then(|b| b.pick(0, &[])).map(|i| i.addr);
    assert_eq!(picked, Some(addr(2, 8080)));
    // The TCP and HTTP backends of one address share its state too.
    let both = [spec("svc", "dc1", vec![inst(1, &["haproxy", "haproxy_tcp=9000"])])];
    let (t3, _) = RoutingTable::build(&cfg(), &both, &carryover);
    let tcp_health = t3
        .tcp_ports()
        .next()
        .map(|(_, b)| b.instances[0].health.clone())
        .expect("tcp");
    assert!(Arc::ptr_eq(&tcp_health, &h(&t1, 0)));

    carryover.retain(&HashSet::from([addr(1, 8080)]));
    assert!(Arc::ptr_eq(&carryover.get(addr(1, 8080)), &h(&t1, 0)));
    let fresh = carryover.get(addr(2, 8080));
    assert!(!Arc::ptr_eq(&fresh, &h(&t1, 1)), "forgotten, so a new state");
    assert!(fresh.check_up.load(Ordering::Relaxed), "new instances start up");
}

#[test]
fn table_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RoutingTable>();
    assert_send_sync::<Carryover>();
    assert_send_sync::<Arc<Backend>>();
}
