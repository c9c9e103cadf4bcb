//! `*.consul` questions forwarded to a real Consul agent: every passing instance,
//! ADDITIONAL kept, nothing cached, failover, SERVFAIL on a dead Consul within the
//! timeout and recovery without restart, truncation handled, in-flight merging.

use std::time::Duration;

use crate::harness::{Consul, Wayfinder, consul_section, dig, unique};

const UPSTREAM: &str = "upstreams = [\"127.0.0.1:9\"]\n";

async fn wayfinder_for(consul: &Consul, extra: &str) -> Wayfinder {
    Wayfinder::start(&format!("{}[dns]\n{UPSTREAM}{extra}", consul_section(consul))).await
}

/// SRV lists every passing instance; Consul's ADDITIONAL A records are passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_lists_every_passing_instance_with_additional_records() {
    let consul = Consul::shared();
    let svc = unique("web");
    for i in 1..=3u16 {
        consul.register(
            &format!("{svc}-{i}"),
            &svc,
            &format!("127.0.1.{i}"),
            8000 + i,
            &[],
            false,
        );
    }
    consul.wait_passing(&svc, 3);
    let wf = wayfinder_for(consul, "").await;
    let d = dig(wf.addr, &[&format!("{svc}.service.consul"), "SRV"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    let srv = d.section("ANSWER");
    assert_eq!(srv.len(), 3, "{}", d.out);
    let mut ports: Vec<&str> = srv.iter().map(|r| r.3.split(' ').nth(2).unwrap()).collect();
    ports.sort();
    assert_eq!(ports, ["8001", "8002", "8003"]);
    let additional: Vec<String> = d
        .section("ADDITIONAL")
        .into_iter()
        .filter(|r| r.2 == "A")
        .map(|r| r.3)
        .collect();
    for i in 1..=3 {
        assert!(additional.contains(&format!("127.0.1.{i}")), "{}", d.out);
    }
    assert_eq!(srv[0].1, 0, "Consul's TTL 0 is passed through");
    wf.stop().await;
}

/// A answers come from Consul (the instances' own addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_answers_are_the_instance_addresses() {
    let consul = Consul::shared();
    let svc = unique("api");
    consul.register(&format!("{svc}-1"), &svc, "127.0.2.1", 80, &[], false);
    consul.register(&format!("{svc}-2"), &svc, "127.0.2.2", 80, &[], false);
    consul.wait_passing(&svc, 2);
    let wf = wayfinder_for(consul, "").await;
    let d = dig(wf.addr, &[&format!("{svc}.service.consul"), "A"]).await;
    assert_eq!(d.answers(), ["127.0.2.1", "127.0.2.2"], "{}", d.out);
    let d = dig(wf.addr, &[&format!("{svc}.service.dc1.consul"), "A"]).await;
    assert_eq!(d.answers(), ["127.0.2.1", "127.0.2.2"], "datacenter form: {}", d.out);
    wf.stop().await;
}

/// Nothing is cached: a failing instance is gone and a new one is there on the
/// very next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_show_on_the_very_next_query() {
    let consul = Consul::shared();
    let svc = unique("fresh");
    consul.register(&format!("{svc}-1"), &svc, "127.0.3.1", 80, &[], true);
    consul.register(&format!("{svc}-2"), &svc, "127.0.3.2", 80, &[], true);
    consul.wait_passing(&svc, 2);
    let wf = wayfinder_for(consul, "").await;
    let name = format!("{svc}.service.consul");
    assert_eq!(dig(wf.addr, &[&name, "A"]).await.answers(), ["127.0.3.1", "127.0.3.2"]);

    consul.set_health(&format!("{svc}-1"), false);
    consul.wait_passing(&svc, 1);
    let d = dig(wf.addr, &[&name, "A"]).await;
    assert_eq!(d.answers(), ["127.0.3.2"], "failed instance still answered: {}", d.out);

    consul.register(&format!("{svc}-3"), &svc, "127.0.3.3", 80, &[], true);
    consul.wait_passing(&svc, 2);
    let d = dig(wf.addr, &[&name, "A"]).await;
    assert_eq!(
        d.answers(),
        ["127.0.3.2", "127.0.3.3"],
        "new instance missing: {}",
        d.out
    );

    consul.set_health(&format!("{svc}-1"), true);
    consul.wait_passing(&svc, 3);
    assert_eq!(
        dig(wf.addr, &[&name, "A"]).await.answers(),
        ["127.0.3.1", "127.0.3.2", "127.0.3.3"]
    );
    let stats = wf.control.stats.route(wayfinder::dns::stats::AnswerSource::Consul);
    assert_eq!(stats.cache_hits, 0, "consul answers must never come from a cache");
    wf.stop().await;
}

/// Unknown services are NXDOMAIN (Consul's answer, with its SOA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_nxdomain() {
    let consul = Consul::shared();
    let wf = wayfinder_for(consul, "").await;
    let d = dig(wf.addr, &[&format!("{}.service.consul", unique("nope")), "SRV"]).await;
    assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
    assert!(d.section("AUTHORITY").iter().any(|r| r.2 == "SOA"), "{}", d.out);
    wf.stop().await;
}

/// `consul_a_records = "lb"`: A questions for services get the LB hosts, SRV still
/// reaches Consul (PanteraS's dnsmasq `--address=/consul/HOST_IP`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_a_records_lb_answers_with_lb_hosts() {
    let consul = Consul::shared();
    let svc = unique("lbmode");
    consul.register(&format!("{svc}-1"), &svc, "127.0.4.1", 8080, &[], false);
    consul.wait_passing(&svc, 1);
    let wf = wayfinder_for(
        consul,
        "consul_a_records = \"lb\"\nwildcard_targets = [\"10.0.0.5\", \"10.0.0.6\"]\n",
    )
    .await;
    let name = format!("{svc}.service.consul");
    let d = dig(wf.addr, &[&name, "A"]).await;
    assert_eq!(d.answers(), ["10.0.0.5", "10.0.0.6"], "{}", d.out);
    let d = dig(wf.addr, &[&name, "SRV"]).await;
    assert_eq!(d.section("ANSWER").len(), 1, "{}", d.out);
    assert!(d.section("ANSWER")[0].3.contains("8080"), "{}", d.out);
    wf.stop().await;
}

/// Consul stopped: SERVFAIL within the configured timeout; Consul back: answers
/// again without restarting Wayfinder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_consul_gives_servfail_in_time_and_recovers() {
    let mut consul = Consul::start();
    consul.register("svc-1", "outage", "127.0.5.1", 80, &[], false);
    consul.wait_passing("outage", 1);
    let wf = wayfinder_for(&consul, "consul_timeout = \"1s\"\n").await;
    assert_eq!(
        dig(wf.addr, &["outage.service.consul", "A"]).await.answers(),
        ["127.0.5.1"]
    );
    let route = || wf.control.stats.route(wayfinder::dns::stats::AnswerSource::Consul);
    assert!(
        route().inline_exchanges >= 1,
        "asked by the UDP worker itself: {:?}",
        route()
    );

    consul.stop();
    let d = dig(wf.addr, &["outage.service.consul", "A"]).await;
    assert_eq!(d.status(), "SERVFAIL", "{}", d.out);
    assert!(d.took < Duration::from_millis(1500), "SERVFAIL took {:?}", d.took);
    assert!(
        route().inline_exchanges >= 2,
        "the worker's own exchange failed too: {:?}",
        route()
    );

    consul.restart();
    consul.register("svc-1", "outage", "127.0.5.1", 80, &[], false);
    consul.wait_passing("outage", 1);
    // The failed server is held down for a few seconds but still tried (it is
    // the only one), so the first query after the restart already answers.
    let d = dig(wf.addr, &["outage.service.consul", "A"]).await;
    assert_eq!(d.answers(), ["127.0.5.1"], "{}", d.out);
    wf.stop().await;
}

/// With the first Consul address dead, the second answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_consul_address_is_used_when_the_first_is_down() {
    let consul = Consul::shared();
    let svc = unique("failover");
    consul.register(&format!("{svc}-1"), &svc, "127.0.6.1", 80, &[], false);
    consul.wait_passing(&svc, 1);
    let dead = crate::harness::free_port();
    let wf = Wayfinder::start(&format!(
        "[consul]\nhttp = \"{}\"\ndns = [\"127.0.0.1:{dead}\", \"{}\"]\n[dns]\n{UPSTREAM}consul_timeout = \"2s\"\n",
        consul.http_addr(),
        consul.dns_addr()
    ))
    .await;
    for _ in 0..3 {
        let d = dig(wf.addr, &[&format!("{svc}.service.consul"), "A"]).await;
        assert_eq!(d.answers(), ["127.0.6.1"], "{}", d.out);
        assert!(d.took < Duration::from_millis(1000), "failover took {:?}", d.took);
    }
    // The first question went to the dead address from the UDP worker itself
    // and on to the second in a task; the others (first one held down) went
    // the task path, second address first.
    let route = wf.control.stats.route(wayfinder::dns::stats::AnswerSource::Consul);
    assert!(route.inline_exchanges >= 1, "{route:?}");
    wf.stop().await;
}

/// A 40-instance SRV answer does not fit UDP: TC over UDP, whole over TCP (and
/// Wayfinder itself uses TCP when Consul truncates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_srv_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let consul = Consul::shared();
    let svc = unique("big");
    for i in 1..=40u16 {
        consul.register(
            &format!("{svc}-{i}"),
            &svc,
            &format!("127.1.0.{i}"),
            9000 + i,
            &[],
            false,
        );
    }
    consul.wait_passing(&svc, 40);
    let wf = wayfinder_for(consul, "").await;
    let name = format!("{svc}.service.consul");
    let udp = dig(wf.addr, &[&name, "SRV", "+ignore"]).await;
    assert!(udp.has_flag("tc"), "expected TC over UDP: {}", udp.out);
    assert!(udp.size() <= 1232, "UDP answer of {} bytes", udp.size());
    let plain = dig(wf.addr, &[&name, "SRV", "+ignore", "+noedns"]).await;
    assert!(plain.has_flag("tc"), "{}", plain.out);
    assert!(plain.size() <= 512, "no-EDNS answer of {} bytes", plain.size());
    let tcp = dig(wf.addr, &[&name, "SRV", "+tcp"]).await;
    assert!(!tcp.has_flag("tc"), "{}", tcp.out);
    assert_eq!(tcp.section("ANSWER").len(), 40, "{}", tcp.out);
    // dig's default: retry over TCP on TC, as resolvers do.
    let auto = dig(wf.addr, &[&name, "SRV"]).await;
    assert_eq!(auto.section("ANSWER").len(), 40, "{}", auto.out);
    wf.stop().await;
}

/// Identical questions in flight at the same moment share one Consul query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_inflight_questions_are_merged() {
    let consul = Consul::shared();
    let svc = unique("merge");
    consul.register(&format!("{svc}-1"), &svc, "127.0.7.1", 80, &[], false);
    consul.wait_passing(&svc, 1);
    let wf = wayfinder_for(consul, "").await;
    let name = format!("{svc}.service.consul.");
    let query = {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(&name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    };
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let total = 200u16;
    let started = std::time::Instant::now();
    for id in 0..total {
        let mut q = query.clone();
        q[0..2].copy_from_slice(&id.to_be_bytes());
        socket.send_to(&q, wf.addr).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 1500];
    while answered < total {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("every query answered")
            .unwrap();
        let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(
            m.answers.len(),
            1,
            "{:?} after {:?}; consul route: {:?}",
            m.metadata,
            started.elapsed(),
            wf.control.stats.route(wayfinder::dns::stats::AnswerSource::Consul)
        );
        answered += 1;
    }
    let stats = wf.control.stats.route(wayfinder::dns::stats::AnswerSource::Consul);
    let exchanges = stats.exchanges();
    assert_eq!(stats.queries, u64::from(total));
    assert!(
        exchanges < u64::from(total) / 2,
        "{exchanges} Consul exchanges for {total} identical questions"
    );
    wf.stop().await;
}
