//! The process's one view of Consul at scale, against private agents with
//! Consul's default limits (`http_max_conns_per_client` = 200, as users run
//! it): a thousand services routed on a handful of connections while another
//! client registers freely; every kind of change reflected; Consul restarted
//! and its index sent backwards by a snapshot restore; no request answered
//! before the first complete table.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wayfinder::consul::http::{Endpoint, MAX_CONNECTIONS};

use crate::harness::{
    BulkInstance, Consul, HttpBackend, Lb, Up, connections_to, consul_section, dig_until, free_port, get_with,
    http_client, http_get, http_put, tagged_backend, unique,
};

/// `n` services `<prefix>-<i>`, one instance each at `backend`, tagged `haproxy`.
fn bulk(prefix: &str, n: usize, backend: SocketAddr) -> Vec<BulkInstance> {
    (0..n)
        .map(|i| BulkInstance {
            id: format!("{prefix}-{i}-1"),
            name: format!("{prefix}-{i}"),
            address: backend.ip().to_string(),
            port: backend.port(),
            tags: vec!["haproxy".into()],
        })
        .collect()
}

/// Consul requests of the endpoints that read the catalog, from `/metrics`.
fn catalog_reads(metrics: &str) -> u64 {
    let wanted = [
        Endpoint::HealthService,
        Endpoint::UiServices,
        Endpoint::UiNodes,
        Endpoint::CatalogServices,
    ];
    metrics
        .lines()
        .filter(|l| l.starts_with("wayfinder_consul_requests_total{"))
        .filter(|l| wanted.iter().any(|e| l.contains(&format!("endpoint=\"{}\"", e.name()))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A thousand services are routed and the dns wildcard follows its Consul
/// target, while this process holds at most `MAX_CONNECTIONS` connections to
/// the agent (counted from /proc); another client on the same address
/// registers and deregisters fifty services without one refusal, each change
/// reflected; status page views cost Consul no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_services_on_a_bounded_set_of_connections() {
    let consul = Consul::start();
    let backend = HttpBackend::start("scale").await;
    let prefix = unique("scale");
    consul.register_bulk("scale-node", "127.0.0.1", &bulk(&prefix, 1000, backend.addr), true);
    let lbhosts = unique("lbhosts");
    consul.register(&format!("{lbhosts}-1"), &lbhosts, "10.9.9.9", 80, &[], true);
    let up = Up::start_on_free_ports(
        || {
            format!(
                "{}[dns]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\nwildcard_domain = \".apps.scale.test\"\n\
                 wildcard_targets = [\"consul:{lbhosts}\"]\n\
                 [lb]\nhttp = \"127.0.0.1:{}\"\nstats = \"\"\nregister = \"\"\nworkers = 1\n",
                consul_section(&consul),
                free_port(),
                free_port(),
            )
        },
        &[("START_CONSUL", "false")],
    )
    .await;
    let (lb, dns) = (up.lb.unwrap(), up.dns.unwrap());
    let client = http_client();
    let started = Instant::now();
    let last = format!("{prefix}-999.service");
    loop {
        if get_with(&client, lb, &last, "/").await.0 == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "1000 services not routed in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..1000 {
        let (status, body, _) = get_with(&client, lb, &format!("{prefix}-{i}.service"), "/").await;
        assert_eq!((status, body.as_str()), (200, "scale"), "service {i}");
    }
    let wildcard = dig_until(
        dns,
        &["anything.apps.scale.test", "A"],
        Duration::from_secs(10),
        "wildcard answers with the consul target",
        |d| d.answers().iter().any(|a| a.ends_with("10.9.9.9")),
    )
    .await;
    assert_eq!(wildcard.status(), "NOERROR");

    let pid = std::process::id();
    let port = consul.ports.http;
    let held = connections_to(pid, port);
    assert!(
        held <= MAX_CONNECTIONS,
        "{held} connections to the agent, at most {MAX_CONNECTIONS} by design"
    );
    let gauge = up.state.appliance.consul.http().stats().connections();
    assert!(gauge as usize <= MAX_CONNECTIONS, "gauge says {gauge}");

    // Another client of the agent, from the same address, changes the catalog
    // while the lb, the dns and the page follow it.
    let churn = unique("churn");
    for i in 0..50 {
        let body = serde_json::json!({
            "ID": format!("{churn}-{i}"), "Name": format!("{churn}-{i}"), "Address": "127.0.0.1",
            "Port": backend.addr.port(), "Tags": ["haproxy"],
        });
        http_put(consul.http_addr(), "/v1/agent/service/register", &body.to_string())
            .unwrap_or_else(|e| panic!("registration {i} refused: {e}"));
    }
    for i in [0, 25, 49] {
        let host = format!("{churn}-{i}.service");
        crate::harness::wait_routed(&client, lb, &host, Duration::from_secs(10), String::new).await;
    }
    for i in 0..50 {
        http_put(
            consul.http_addr(),
            &format!("/v1/agent/service/deregister/{churn}-{i}"),
            "",
        )
        .unwrap_or_else(|e| panic!("deregistration {i} refused: {e}"));
    }
    let gone = format!("{churn}-49.service");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_with(&client, lb, &gone, "/").await.0 != 503 {
        assert!(Instant::now() < deadline, "{gone} still routed after deregistration");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = connections_to(pid, port);
    assert!(held <= MAX_CONNECTIONS, "{held} connections after the churn");

    // The page and the API read the view: no catalog read per view.
    let metrics = |c: &reqwest::Client| {
        let c = c.clone();
        let admin = up.admin;
        async move {
            c.get(format!("http://{admin}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    // Quiet first: the churn's changes may still be being read.
    let mut before = catalog_reads(&metrics(&client).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = catalog_reads(&metrics(&client).await);
        if now == before {
            break;
        }
        assert!(Instant::now() < deadline, "the view never went quiet");
        before = now;
    }
    for _ in 0..5 {
        let status: serde_json::Value = client
            .get(format!("http://{}/api/status", up.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let services = status["services"].as_array().unwrap();
        assert!(services.len() >= 1000, "{} services on the status page", services.len());
        let page = client.get(format!("http://{}/", up.admin)).send().await.unwrap();
        assert_eq!(page.status(), 200);
    }
    let after = catalog_reads(&metrics(&client).await);
    assert_eq!(before, after, "status views read Consul");
    let text = metrics(&client).await;
    for family in [
        "wayfinder_consul_connections ",
        "wayfinder_consul_watch_age_seconds{watch=\"registrations\"}",
        "wayfinder_lb_ready 1",
        "wayfinder_consul_view_services ",
    ] {
        assert!(text.contains(family), "`{family}` not in /metrics");
    }
    up.stop().await;
}

/// A registration, a failing and a passing check, a re-registration on a new
/// port with everything else unchanged, a second instance without any check,
/// and a deregistration each reach the lb within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_is_reflected() {
    let consul = Consul::start();
    let lb = Lb::start(&consul_section(&consul)).await;
    let (one, two, three) = (
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
        HttpBackend::start("three").await,
    );
    let svc = unique("changes");
    let host = format!("{svc}.service");
    let id = format!("{svc}-1");
    let answers = |lb: &Lb, want: &'static [&'static str]| {
        let host = host.clone();
        let client = lb.client.clone();
        let addr = lb.addr;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut seen = Vec::new();
                for _ in 0..6 {
                    let (status, body, _) = get_with(&client, addr, &host, "/").await;
                    seen.push(if status == 200 { body } else { status.to_string() });
                }
                seen.sort();
                seen.dedup();
                if seen == want {
                    return;
                }
                assert!(Instant::now() < deadline, "wanted {want:?}, the lb answers {seen:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    consul.register(&id, &svc, "127.0.0.1", one.addr.port(), &["haproxy"], true);
    answers(&lb, &["one"]).await;
    consul.set_health(&id, false);
    answers(&lb, &["503"]).await;
    consul.set_health(&id, true);
    answers(&lb, &["one"]).await;
    // Same ID, same tags, same (passing) check: only the port moves.
    consul.register(&id, &svc, "127.0.0.1", two.addr.port(), &["haproxy"], true);
    answers(&lb, &["two"]).await;
    // A second instance with no check at all (Consul counts it passing).
    let body = serde_json::json!({
        "ID": format!("{svc}-2"), "Name": svc, "Address": "127.0.0.1", "Port": three.addr.port(), "Tags": ["haproxy"],
    });
    http_put(consul.http_addr(), "/v1/agent/service/register", &body.to_string()).unwrap();
    answers(&lb, &["three", "two"]).await;
    consul.deregister(&id);
    answers(&lb, &["three"]).await;
    consul.deregister(&format!("{svc}-2"));
    answers(&lb, &["503"]).await;
    let view = lb.state.view.get().expect("the lb reads the view").status().snapshot();
    assert!(view.ok, "{view:?}");
    lb.stop().await;
}

/// A Consul that restarts with nothing (dev agents keep no state: every index
/// starts again from 1) and a snapshot restore (indexes go back) are both
/// followed without restarting Wayfinder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_restart_and_a_backwards_index_recover() {
    let mut consul = Consul::start();
    let lb = Lb::start(&consul_section(&consul)).await;
    let (before, after) = (HttpBackend::start("before").await, HttpBackend::start("after").await);
    let svc = unique("restart");
    let host = format!("{svc}.service");
    consul.register(
        &format!("{svc}-1"),
        &svc,
        "127.0.0.1",
        before.addr.port(),
        &["haproxy"],
        true,
    );
    crate::harness::wait_routed(&lb.client, lb.addr, &host, Duration::from_secs(10), String::new).await;
    // Many writes so that the restarted agent's indexes are far below.
    let noise = unique("noise");
    consul.register_bulk("noise-node", "127.0.0.1", &bulk(&noise, 100, before.addr), true);

    consul.restart();
    consul.register(
        &format!("{svc}-1"),
        &svc,
        "127.0.0.1",
        after.addr.port(),
        &["haproxy"],
        true,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = lb.get(&host, "/").await;
        if (status, body.as_str()) == (200, "after") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not following the restarted agent: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noise_host = format!("{noise}-1.service");
    assert_eq!(lb.get(&noise_host, "/").await.0, 503, "gone with the old agent's state");
    // The restarted agent lost the lb's own registration too: it comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(consul.http_addr(), "/v1/catalog/service/wayfinder-lb")
        .unwrap_or_default()
        .trim()
        == "[]"
    {
        assert!(Instant::now() < deadline, "the lb did not register itself again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Backwards: snapshot, more changes, restore the snapshot.
    let snapshot = snapshot_save(consul.http_addr());
    let late = unique("late");
    consul.register(
        &format!("{late}-1"),
        &late,
        "127.0.0.1",
        after.addr.port(),
        &["haproxy"],
        true,
    );
    let late_host = format!("{late}.service");
    crate::harness::wait_routed(&lb.client, lb.addr, &late_host, Duration::from_secs(10), String::new).await;
    let resets = |lb: &Lb| {
        let view = lb.state.view.get().unwrap().status().snapshot();
        view.watches.iter().find(|w| w.name == "registrations").unwrap().resets
    };
    let before_restore = resets(&lb);
    snapshot_restore(consul.http_addr(), &snapshot);
    let deadline = Instant::now() + Duration::from_secs(30);
    while resets(&lb) == before_restore {
        assert!(
            Instant::now() < deadline,
            "the restore's backwards index was never seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wayfinder now agrees with what Consul says after the restore (it drops the
    // late service; in a race with its own log a dev agent may keep it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consul_keeps = http_get(consul.http_addr(), &format!("/v1/catalog/service/{late}"))
        .unwrap()
        .trim()
        != "[]";
    let want = if consul_keeps { 200 } else { 503 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.get(&late_host, "/").await.0 != want {
        assert!(
            Instant::now() < deadline,
            "after the restore Consul {} the late service; the lb does not agree",
            if consul_keeps { "keeps" } else { "dropped" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lb.get(&host, "/").await.1, "after", "restored state is served");
    let view = lb.state.view.get().unwrap().status().snapshot();
    assert!(view.full_syncs >= 2, "{view:?}");
    lb.stop().await;
}

fn snapshot_save(addr: SocketAddr) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /v1/snapshot HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("http head") + 4;
    assert!(
        raw.starts_with(b"HTTP/1.0 200") || raw.starts_with(b"HTTP/1.1 200"),
        "snapshot refused"
    );
    raw[split..].to_vec()
}

fn snapshot_restore(addr: SocketAddr, snapshot: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /v1/snapshot HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n",
        snapshot.len()
    )
    .unwrap();
    s.write_all(snapshot).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
        "restore: {resp}"
    );
}

/// Until the first table from a complete read of Consul is live, requests
/// wait (the stats page says so) and then get the right answer, not 503. The
/// lb reaches Consul through a gate that holds every connection until opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_answered_before_the_first_table() {
    let consul = Consul::start();
    let (svc, _backend) = tagged_backend(&consul, "first", "first").await;
    let gate = Gate::start(consul.http_addr()).await;
    let lb = Lb::start(&format!(
        "[consul]\nhttp = \"{}\"\ndns = [\"{}\"]\n[lb]\nready_timeout = \"60s\"\n",
        gate.addr,
        consul.dns_addr()
    ))
    .await;
    let host = format!("{svc}.service");
    let early = {
        let (client, addr, host) = (lb.client.clone(), lb.addr, host.clone());
        tokio::spawn(async move { get_with(&client, addr, &host, "/").await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!early.is_finished(), "answered before any table");
    let stats = reqwest::get(format!("http://{}/stats.json", lb.stats))
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(stats["ready"], false, "{stats:#}");
    gate.open();
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(20), early)
        .await
        .expect("answered once the table is built")
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "first"), "the early request");
    let stats = http_get(lb.stats, "/stats.json").unwrap();
    assert!(stats.contains("\"ready\": true"), "{stats}");
    lb.stop().await;
}

/// A TCP forwarder to `target` that holds every connection until opened.
struct Gate {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    if rx.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Gate { addr, open }
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// The view's own summary of each service agrees with Consul's `ui/services`
/// for every shape of registration (agent and catalog, node checks, several
/// checks, a warning, none, two nodes): a new registration then flags no
/// other service and needs no full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_agrees_with_consuls_summary() {
    let consul = Consul::start();
    let backend = HttpBackend::start("shape").await;
    let port = backend.addr.port();
    let put = |path: &str, body: serde_json::Value| {
        http_put(consul.http_addr(), path, &body.to_string()).unwrap_or_else(|e| panic!("{path}: {e}"));
    };
    let tags = serde_json::json!(["haproxy", "x", "haproxy"]);
    put(
        "/v1/agent/service/register",
        serde_json::json!({"ID": "ttl-1", "Name": "ttl", "Address": "127.0.0.1", "Port": port, "Tags": tags,
            "Check": {"TTL": "10m", "Status": "passing"}}),
    );
    put(
        "/v1/agent/service/register",
        serde_json::json!({"ID": "two-1", "Name": "two", "Address": "127.0.0.1", "Port": port, "Tags": ["haproxy"],
            "Checks": [{"TTL": "10m", "Status": "passing"}, {"TTL": "10m", "Status": "warning"}]}),
    );
    put(
        "/v1/agent/service/register",
        serde_json::json!({"ID": "bare-1", "Name": "bare", "Port": port, "Tags": ["haproxy"]}),
    );
    for node in ["shape-a", "shape-b"] {
        put(
            "/v1/catalog/register",
            serde_json::json!({"Node": node, "Address": "127.0.0.1",
                "Service": {"ID": "multi-1", "Service": "multi", "Port": port, "Tags": ["haproxy"]},
                "Checks": [{"CheckID": "multi-1-c", "Name": "c", "Status": "critical", "ServiceID": "multi-1"},
                           {"CheckID": "node-c", "Name": "n", "Status": "passing"}]}),
        );
    }
    let lb = Lb::start(&format!("{}[lb]\nregister = \"\"\n", consul_section(&consul))).await;
    crate::harness::wait_routed(&lb.client, lb.addr, "ttl.service", Duration::from_secs(10), String::new).await;
    let view = lb.state.view.get().unwrap().clone();
    // Line by line, from the view (built by a full sync) and from single
    // fetches, against what Consul's summary says. The agent syncs its own
    // registrations' checks to the catalog a moment after the services, and the
    // view follows: compare once both have settled (a first look may catch
    // Consul between the two), failing with the last difference.
    let read_summary = || -> Vec<wayfinder::consul::api::UiService> {
        serde_json::from_str(&http_get(consul.http_addr(), "/v1/internal/ui/services").unwrap()).unwrap()
    };
    let differences = |summary: &[wayfinder::consul::api::UiService]| -> Vec<String> {
        let picture = view.current();
        let mut out = Vec::new();
        if summary.len() != picture.services.len() {
            out.push(format!(
                "{} lines vs {:?}",
                summary.len(),
                picture.services.keys().collect::<Vec<_>>()
            ));
        }
        for line in summary {
            let consul_line = wayfinder::consul::catalog::SummaryLine::from(line.clone());
            match picture.services.get(&line.name) {
                Some(entry) if entry.summary_line() == consul_line => {}
                other => out.push(format!(
                    "{}: view {:?} vs consul {consul_line:?}",
                    line.name,
                    other.map(|e| e.summary_line())
                )),
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let summary = loop {
        let summary = read_summary();
        let diff = differences(&summary);
        if diff.is_empty() {
            break summary;
        }
        assert!(
            Instant::now() < deadline,
            "the view never agreed with ui/services: {diff:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for line in summary {
        let name = line.name.clone();
        let consul_line = wayfinder::consul::catalog::SummaryLine::from(line);
        let rows: Vec<wayfinder::consul::api::HealthRow> =
            serde_json::from_str(&http_get(consul.http_addr(), &format!("/v1/health/service/{name}")).unwrap())
                .unwrap();
        let fetched = wayfinder::consul::ServiceEntry::from_health(&name, rows).unwrap();
        assert_eq!(fetched.summary_line(), consul_line, "{name}, fetched");
    }
    let quiet = |view: &wayfinder::consul::CatalogView| {
        let view = view.clone();
        async move {
            let mut last = view.status().snapshot();
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let now = view.status().snapshot();
                if (now.fetches, now.full_syncs, now.summaries) == (last.fetches, last.full_syncs, last.summaries) {
                    return now;
                }
                last = now;
            }
        }
    };
    let before = tokio::time::timeout(Duration::from_secs(30), quiet(&view))
        .await
        .expect("quiet");
    put(
        "/v1/agent/service/register",
        serde_json::json!({"ID": "new-1", "Name": "new", "Address": "127.0.0.1", "Port": port, "Tags": ["haproxy"],
            "Check": {"TTL": "10m", "Status": "passing"}}),
    );
    crate::harness::wait_routed(&lb.client, lb.addr, "new.service", Duration::from_secs(10), String::new).await;
    let after = tokio::time::timeout(Duration::from_secs(30), quiet(&view))
        .await
        .expect("quiet");
    assert!(
        after.summaries > before.summaries,
        "the change was localized: {after:?}"
    );
    assert!(
        after.flagged - before.flagged <= 1,
        "one registration flagged {} services: the view's summary disagrees with Consul's ({before:?} -> {after:?})",
        after.flagged - before.flagged
    );
    assert_eq!(
        after.full_syncs, before.full_syncs,
        "the change was explained without a full sync"
    );
    lb.stop().await;
}
