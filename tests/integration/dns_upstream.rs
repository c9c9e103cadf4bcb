//! Everything else goes to the upstream resolvers through the cache: positive
//! answers by TTL, negative answers by SOA (RFC 2308), stale answers when every
//! upstream fails (RFC 8767), failover between upstreams, TCP.

use std::time::Duration;

use crate::harness::{Unbound, Wayfinder, dig, free_port};
use wayfinder::dns::stats::AnswerSource;

async fn cached_server(upstream: &Unbound, extra: &str) -> Wayfinder {
    Wayfinder::start(&format!("[dns]\nupstreams = [\"{}\"]\n{extra}", upstream.addr)).await
}

/// A positive answer is fetched once and then served from the cache with its
/// TTL counting down (RFC 1035 3.2.1: TTL is the time it may be cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_are_cached_and_age() {
    let upstream = Unbound::start(&["www.test. 300 IN A 192.0.2.10"]);
    let wf = cached_server(&upstream, "").await;
    let first = dig(wf.addr, &["www.test", "A"]).await;
    assert_eq!(first.answers(), ["192.0.2.10"], "{}", first.out);
    assert!(first.has_flag("ra"));
    let again = dig(wf.addr, &["WWW.Test", "A"]).await;
    assert_eq!(again.answers(), ["192.0.2.10"]);
    assert_eq!(upstream.queries("www.test.", "A"), 1, "the upstream must see one query");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let aged = dig(wf.addr, &["www.test", "A"]).await;
    let ttl = aged.section("ANSWER")[0].1;
    assert!((297..=298).contains(&ttl), "TTL should have aged by 2 s: {ttl}");
    assert_eq!(upstream.queries("www.test.", "A"), 1);
    let stats = wf.control.stats.route(AnswerSource::Upstream);
    assert_eq!(stats.cache_hits, 2);
    assert_eq!(stats.queries, 3);
    wf.stop().await;
}

/// NXDOMAIN and NODATA are cached for min(SOA TTL, SOA MINIMUM) (RFC 2308 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_answers_are_cached() {
    let upstream = Unbound::start(&["www.test. 300 IN A 192.0.2.10"]);
    let wf = cached_server(&upstream, "").await;
    for _ in 0..3 {
        let d = dig(wf.addr, &["missing.test", "A"]).await;
        assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
        assert_eq!(d.section("AUTHORITY")[0].2, "SOA", "{}", d.out);
        let d = dig(wf.addr, &["www.test", "AAAA"]).await;
        assert_eq!(d.status(), "NOERROR", "{}", d.out);
        assert!(d.answers().is_empty());
    }
    assert_eq!(upstream.queries("missing.test.", "A"), 1);
    assert_eq!(upstream.queries("www.test.", "AAAA"), 1);
    wf.stop().await;
}

/// With every upstream dead, an expired answer is served with TTL 30 (RFC 8767
/// section 4); a name never seen gets SERVFAIL within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_answers_are_served_when_the_upstream_dies() {
    let mut upstream = Unbound::start(&["short.test. 1 IN A 192.0.2.20"]);
    let wf = cached_server(&upstream, "upstream_timeout = \"500ms\"\n").await;
    assert_eq!(dig(wf.addr, &["short.test", "A"]).await.answers(), ["192.0.2.20"]);
    tokio::time::sleep(Duration::from_millis(1200)).await; // expired now
    upstream.stop();
    let d = dig(wf.addr, &["short.test", "A"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert_eq!(d.answers(), ["192.0.2.20"], "{}", d.out);
    assert_eq!(d.section("ANSWER")[0].1, 30, "stale TTL: {}", d.out);
    let never = dig(wf.addr, &["never.test", "A"]).await;
    assert_eq!(never.status(), "SERVFAIL", "{}", never.out);
    assert!(never.took < Duration::from_millis(1000), "took {:?}", never.took);
    let stats = wf.control.stats.route(AnswerSource::Upstream);
    assert_eq!(stats.stale_served, 1);
    wf.stop().await;
}

/// Serve-stale can be switched off: then a dead upstream means SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stale_off_gives_servfail() {
    let mut upstream = Unbound::start(&["short.test. 1 IN A 192.0.2.20"]);
    let wf = cached_server(&upstream, "upstream_timeout = \"500ms\"\nserve_stale = \"0s\"\n").await;
    assert_eq!(dig(wf.addr, &["short.test", "A"]).await.answers(), ["192.0.2.20"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    upstream.stop();
    assert_eq!(dig(wf.addr, &["short.test", "A"]).await.status(), "SERVFAIL");
    wf.stop().await;
}

/// The next upstream answers when the first one is down; questions over TCP are
/// answered too (RFC 7766).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failover_and_tcp() {
    let upstream = Unbound::start(&["www.test. 300 IN A 192.0.2.10", "other.test. 300 IN A 192.0.2.11"]);
    let dead = free_port();
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"127.0.0.1:{dead}\", \"{}\"]\n",
        upstream.addr
    ))
    .await;
    let d = dig(wf.addr, &["www.test", "A"]).await;
    assert_eq!(d.answers(), ["192.0.2.10"], "{}", d.out);
    assert!(d.took < Duration::from_millis(1000), "failover took {:?}", d.took);
    let d = dig(wf.addr, &["other.test", "A", "+tcp"]).await;
    assert_eq!(d.answers(), ["192.0.2.11"], "{}", d.out);
    let d = dig(wf.addr, &["www.test", "A", "+tcp"]).await;
    assert_eq!(d.answers(), ["192.0.2.10"], "cached answer over TCP: {}", d.out);
    wf.stop().await;
}

/// An upstream answer larger than the UDP size we advertise (1232) comes back
/// with TC; Wayfinder asks again over TCP and caches the whole answer, which a
/// TCP client then gets complete (RFC 7766 section 5, RFC 6891 section 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_answers_are_fetched_over_tcp() {
    let records: Vec<String> = (0..20)
        .map(|i| format!("big.test. 300 IN TXT \\\"{i:02}{}\\\"", "x".repeat(100)))
        .collect();
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let upstream = Unbound::start(&refs);
    let wf = cached_server(&upstream, "").await;
    let udp = dig(wf.addr, &["big.test", "TXT", "+ignore"]).await;
    assert!(udp.has_flag("tc"), "2 KiB does not fit 1232 bytes: {}", udp.out);
    let tcp = dig(wf.addr, &["big.test", "TXT", "+tcp"]).await;
    assert_eq!(tcp.section("ANSWER").len(), 20, "{}", tcp.out);
    assert_eq!(
        upstream.queries("big.test.", "TXT"),
        2,
        "one UDP try, then TCP; the second client is served from cache"
    );
    wf.stop().await;
}
