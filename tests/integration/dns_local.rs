//! Answers Wayfinder owns: the wildcard LB domain (static and `consul:` targets
//! following health) and authoritative zones from `zones_dir` (AA, reloads, broken
//! files rejected with the previous version kept).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Consul, Unbound, Wayfinder, consul_section, dig, dig_until, unique};

const WILDCARD: &str = "wildcard_domain = \".apps.example.com\"\n";

/// Every name at any depth under the wildcard domain gets the LB hosts, with AA;
/// other types are NODATA with the SOA (RFC 2308 section 2.2), SOA/NS at the apex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_names_at_any_depth_get_the_lb_hosts() {
    let upstream = Unbound::start(&[]);
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"{}\"]\n{WILDCARD}wildcard_targets = [\"10.0.0.5\", \"10.0.0.6\"]\n",
        upstream.addr
    ))
    .await;
    for name in [
        "web.apps.example.com",
        "a.b.c.d.apps.example.com",
        "Mixed.Apps.Example.COM",
        "apps.example.com",
    ] {
        let d = dig(wf.addr, &[name, "A"]).await;
        assert_eq!(d.answers(), ["10.0.0.5", "10.0.0.6"], "{name}: {}", d.out);
        assert!(d.has_flag("aa"), "{name}: {}", d.out);
    }
    for (name, rtype) in [("web.apps.example.com", "AAAA"), ("web.apps.example.com", "MX")] {
        let d = dig(wf.addr, &[name, rtype]).await;
        assert_eq!(d.status(), "NOERROR", "{}", d.out);
        assert!(d.answers().is_empty(), "{}", d.out);
        assert_eq!(d.section("AUTHORITY")[0].2, "SOA", "{}", d.out);
    }
    let soa = dig(wf.addr, &["apps.example.com", "SOA"]).await;
    assert_eq!(soa.section("ANSWER")[0].2, "SOA", "{}", soa.out);
    let ns = dig(wf.addr, &["apps.example.com", "NS"]).await;
    assert_eq!(ns.answers(), ["ns.apps.example.com."], "{}", ns.out);
    // A name that merely ends the same way is not in the domain.
    let other = dig(wf.addr, &["myapps.example.com", "A"]).await;
    assert!(other.answers().is_empty(), "{}", other.out);
    assert_eq!(upstream.queries("web.apps.example.com.", "A"), 0);
    wf.stop().await;
}

/// `consul:SERVICE` targets are the passing instances, followed live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_targets_follow_health() {
    let consul = Consul::shared();
    let lb = unique("wayfinder-lb");
    consul.register(&format!("{lb}-1"), &lb, "10.1.0.1", 80, &[], true);
    consul.register(&format!("{lb}-2"), &lb, "10.1.0.2", 80, &[], true);
    consul.wait_passing(&lb, 2);
    let wf = Wayfinder::start(&format!(
        "{}[dns]\nupstreams = [\"127.0.0.1:9\"]\n{WILDCARD}wildcard_targets = [\"consul:{lb}\"]\n",
        consul_section(consul)
    ))
    .await;
    wait_for_targets(wf.addr, &["10.1.0.1", "10.1.0.2"]).await;

    consul.set_health(&format!("{lb}-1"), false);
    let started = Instant::now();
    wait_for_targets(wf.addr, &["10.1.0.2"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    consul.set_health(&format!("{lb}-1"), true);
    wait_for_targets(wf.addr, &["10.1.0.1", "10.1.0.2"]).await;
    consul.deregister(&format!("{lb}-2"));
    wait_for_targets(wf.addr, &["10.1.0.1"]).await;
    wf.stop().await;
}

async fn wait_for_targets(addr: std::net::SocketAddr, want: &[&str]) {
    dig_until(
        addr,
        &["x.apps.example.com", "A"],
        Duration::from_secs(5),
        &format!("targets {want:?}"),
        |d| d.answers() == want,
    )
    .await;
}

const ZONE_V1: &str = "$TTL 60
@    IN SOA ns.example.internal. hostmaster.example.internal. 1 3600 600 86400 30
@    IN NS  ns.example.internal.
ns   IN A   10.9.9.9
db   IN A   10.9.9.10
www  IN CNAME db
*.wild IN A 10.9.9.99
";

fn write_zone(dir: &Path, file: &str, text: &str) {
    // Write then rename, as editors and config management do: never a half file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

async fn zone_server(dir: &Path, poll: &str) -> (Unbound, Wayfinder) {
    let upstream = Unbound::start(&[]);
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"{}\"]\nzones_dir = \"{}\"\nzones_poll = \"{poll}\"\n",
        upstream.addr,
        dir.display()
    ))
    .await;
    (upstream, wf)
}

/// Zones are answered authoritatively (RFC 1035 4.1.1 AA; NXDOMAIN and NODATA
/// with the zone's SOA, RFC 2308), CNAMEs chased and wildcards expanded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_are_served_authoritatively() {
    let dir = tempfile::tempdir().unwrap();
    write_zone(dir.path(), "example.internal.zone", ZONE_V1);
    let (upstream, wf) = zone_server(dir.path(), "1h").await;
    let d = dig(wf.addr, &["db.example.internal", "A"]).await;
    assert_eq!(d.answers(), ["10.9.9.10"], "{}", d.out);
    assert!(d.has_flag("aa"), "{}", d.out);
    assert_eq!(d.section("ANSWER")[0].1, 60);
    let d = dig(wf.addr, &["www.example.internal", "A"]).await;
    assert!(d.answers().contains(&"db.example.internal.".to_string()), "{}", d.out);
    assert!(d.answers().contains(&"10.9.9.10".to_string()), "{}", d.out);
    let d = dig(wf.addr, &["any.wild.example.internal", "A"]).await;
    assert_eq!(d.answers(), ["10.9.9.99"], "{}", d.out);
    let d = dig(wf.addr, &["missing.example.internal", "A"]).await;
    assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
    assert!(d.has_flag("aa"));
    assert_eq!(d.section("AUTHORITY")[0].2, "SOA", "{}", d.out);
    let d = dig(wf.addr, &["db.example.internal", "MX"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert!(d.answers().is_empty());
    assert_eq!(d.section("AUTHORITY")[0].2, "SOA", "{}", d.out);
    assert_eq!(
        upstream.queries("db.example.internal.", "A"),
        0,
        "zone names never go upstream"
    );
    wf.stop().await;
}

/// A changed zone file is picked up by the poll, a new file becomes a zone, a
/// removed file stops being one, and queries keep being answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_changes_are_reloaded_without_dropping_queries() {
    let dir = tempfile::tempdir().unwrap();
    write_zone(dir.path(), "example.internal.zone", ZONE_V1);
    let (_upstream, wf) = zone_server(dir.path(), "100ms").await;
    assert_eq!(
        dig(wf.addr, &["db.example.internal", "A"]).await.answers(),
        ["10.9.9.10"]
    );

    // A load loop runs through every reload below and must lose nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = tokio::spawn(query_loop(wf.addr, stop.clone(), sent.clone(), lost.clone()));

    for round in 2..6 {
        let text = ZONE_V1
            .replace(" 1 3600", &format!(" {round} 3600"))
            .replace("10.9.9.10", &format!("10.9.9.{round}0"));
        write_zone(dir.path(), "example.internal.zone", &text);
        let want = format!("10.9.9.{round}0");
        dig_until(
            wf.addr,
            &["db.example.internal", "A"],
            Duration::from_secs(3),
            &format!("reload {round}"),
            |d| d.answers() == [want.clone()],
        )
        .await;
    }

    write_zone(
        dir.path(),
        "second.internal.zone",
        "@ 60 IN SOA ns.second.internal. h.second.internal. 1 3600 600 86400 30\nhost 60 IN A 10.8.8.8\n",
    );
    let addr = wf.addr;
    dig_until(
        addr,
        &["host.second.internal", "A"],
        Duration::from_secs(3),
        "new zone file served",
        |d| d.answers() == ["10.8.8.8"],
    )
    .await;
    std::fs::remove_file(dir.path().join("second.internal.zone")).unwrap();
    dig_until(
        addr,
        &["host.second.internal", "A"],
        Duration::from_secs(3),
        "removed zone no longer served",
        |d| !d.has_flag("aa"),
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, lost) = (sent.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    assert!(sent > 50, "load loop sent only {sent}");
    assert_eq!(lost, 0, "{lost} of {sent} queries unanswered during reloads");
    wf.stop().await;
}

/// Sends one query at a time for the zone's name until `stop`; counts the ones
/// without a NOERROR answer within a second.
async fn query_loop(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>, lost: Arc<AtomicU64>) {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 1500];
    let mut id = 0u16;
    while !stop.load(Ordering::Relaxed) {
        id = id.wrapping_add(1);
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("db.example.internal.").unwrap(),
            RecordType::A,
        ));
        socket.send_to(&m.to_vec().unwrap(), addr).await.unwrap();
        sent.fetch_add(1, Ordering::Relaxed);
        let ok = loop {
            match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    let Ok(r) = Message::from_vec(&buf[..n]) else {
                        break false;
                    };
                    if r.metadata.id != id {
                        continue;
                    }
                    break r.answers.len() == 1;
                }
                _ => break false,
            }
        };
        if !ok {
            lost.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A broken zone file is reported and the previous version keeps being served;
/// a broken new file is not served at all; fixing it is picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_zone_file_keeps_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    write_zone(dir.path(), "example.internal.zone", ZONE_V1);
    let (_upstream, wf) = zone_server(dir.path(), "100ms").await;
    assert_eq!(
        dig(wf.addr, &["db.example.internal", "A"]).await.answers(),
        ["10.9.9.10"]
    );

    write_zone(
        dir.path(),
        "example.internal.zone",
        &ZONE_V1.replace("db   IN A   10.9.9.10", "db   IN A   not-an-address"),
    );
    write_zone(dir.path(), "broken.internal.zone", "this is not a zone file\n");
    tokio::time::sleep(Duration::from_millis(500)).await; // several polls
    let d = dig(wf.addr, &["db.example.internal", "A"]).await;
    assert_eq!(d.answers(), ["10.9.9.10"], "previous version must stay: {}", d.out);
    let d = dig(wf.addr, &["x.broken.internal", "A"]).await;
    assert!(!d.has_flag("aa"), "a zone that never loaded is not served: {}", d.out);

    write_zone(
        dir.path(),
        "example.internal.zone",
        &ZONE_V1.replace("10.9.9.10", "10.9.9.77").replace(" 1 3600", " 2 3600"),
    );
    dig_until(
        wf.addr,
        &["db.example.internal", "A"],
        Duration::from_secs(3),
        "fixed zone file picked up",
        |d| d.answers() == ["10.9.9.77"],
    )
    .await;
    wf.stop().await;
}

/// The reload trigger (what SIGHUP and the admin API use) reloads at once even
/// when polling is far off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_trigger_reloads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    write_zone(dir.path(), "example.internal.zone", ZONE_V1);
    let (_upstream, wf) = zone_server(dir.path(), "1h").await;
    assert_eq!(
        dig(wf.addr, &["db.example.internal", "A"]).await.answers(),
        ["10.9.9.10"]
    );
    write_zone(
        dir.path(),
        "example.internal.zone",
        &ZONE_V1.replace("10.9.9.10", "10.9.9.11"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        dig(wf.addr, &["db.example.internal", "A"]).await.answers(),
        ["10.9.9.10"],
        "no poll for an hour: the old answer stays until the trigger"
    );
    wf.control.reload_zones.notify_one();
    dig_until(
        wf.addr,
        &["db.example.internal", "A"],
        Duration::from_secs(2),
        "reload trigger obeyed",
        |d| d.answers() == ["10.9.9.11"],
    )
    .await;
    wf.stop().await;
}
