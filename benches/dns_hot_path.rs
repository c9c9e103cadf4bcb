//! The per-query CPU cost of Wayfinder's DNS hot path, without sockets.
//!
//! What it measures, one client query each iteration:
//!
//! * `wire/*`: the building blocks of every cached answer: `parse_query` (header,
//!   question, EDNS), `ParsedQuery::key` (the cache key), `finish` (patch a cached
//!   template for one client: ID, flags, question case, TTLs aged, OPT appended),
//!   `parse+key+finish` (all three, i.e. the fast path minus the cache lookup), and
//!   `make_template` (turning an upstream response into a template: once per cache
//!   fill, not per answered query, shown for scale).
//! * `engine/classify/*`: `Engine::classify` on a cache hit, the function the UDP
//!   workers call for every datagram: parse, allow-list check, cache lookup (moka),
//!   `finish`, counters. Measured for a wildcard name (a local LB answer), for a
//!   cached upstream answer (TTL aged per client), and cycling through 1000
//!   wildcard names (the `wildcard` mix of `benches/dns-compare.sh`, where the
//!   working set no longer sits in L1).
//!
//! Why: on the 2-core benchmark machine the load generator, not the server, caps
//! end-to-end QPS (see benches/README.md), so the socket benchmark cannot show
//! the server's headroom by itself. These numbers are the server-side CPU per
//! answered query; criterion's throughput line (elements/s) is the ceiling one core
//! could answer from the cache if syscalls were free. A regression here is a
//! regression in every cached answer. The cost of `recvmmsg`/`sendmmsg` and the
//! kernel's loopback path is not included; compare `dns-compare.sh`'s
//! `QPS/core` column for the whole picture.
//!
//! Run: `cargo bench --bench dns_hot_path` (add `-- --warm-up-time 1
//! --measurement-time 2` for a quick look, or a filter such as `-- engine`).
//! The engine benches start a tokio runtime and a stand-in upstream resolver on
//! 127.0.0.1 (one UDP socket answering 3 A records), used once to fill the cache.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio_util::sync::CancellationToken;
use wayfinder::dns::engine::{Engine, Verdict};
use wayfinder::dns::stats::DnsStats;
use wayfinder::dns::wildcard::LbAnswers;
use wayfinder::dns::wire::{self, MAX_KEY_LEN, Transport, TtlRewrite};
use wayfinder::dns::zones::Zones;

/// A query as a stub resolver sends it: RD, EDNS with a 1232-byte payload, and the
/// name in mixed case (0x20 randomisation), which `finish` has to echo.
fn client_query(name: &str, rtype: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(Name::from_str(name).expect("valid name"), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    let mut bytes = m.to_vec().expect("query encodes");
    // Mixed case as 0x20-randomising resolvers send it (hickory encodes lower case).
    for (i, b) in bytes[wire::HEADER_LEN..].iter_mut().enumerate() {
        if i % 3 == 1 && b.is_ascii_lowercase() {
            *b = b.to_ascii_uppercase();
        }
        if *b == 0 {
            break;
        }
    }
    bytes
}

/// An upstream resolver's answer: 3 A records with compressed owner names and an
/// OPT record, as unbound returns for a cached name.
fn upstream_response(name: &str) -> Vec<u8> {
    let mut m = Message::new(0x4d2, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    let n = Name::from_str(name).expect("valid name");
    m.add_query(HQuery::query(n.clone(), RecordType::A));
    for i in 0..3 {
        m.add_answer(Record::from_rdata(n.clone(), 300, RData::A(A::new(192, 0, 2, 10 + i))));
    }
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    m.to_vec().expect("response encodes")
}

fn wire_benches(c: &mut Criterion) {
    let query = client_query("www.example.org.", RecordType::A, 0x1234);
    let response = upstream_response("www.example.org.");
    let template = wire::make_template(&response).expect("response makes a template");
    let parsed = wire::parse_query(&query).expect("query parses");

    // Sanity: the finished answer is a valid response to this client.
    let mut out = Vec::with_capacity(512);
    wire::finish(&template, &parsed, TtlRewrite::Age(17), parsed.udp_limit(), &mut out);
    let answer = Message::from_vec(&out).expect("finished answer parses");
    assert_eq!(answer.metadata.id, 0x1234);
    assert_eq!(answer.answers.len(), 3);
    assert_eq!(answer.answers[0].ttl, 283);

    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_query", |b| {
        b.iter(|| wire::parse_query(black_box(&query)).is_ok())
    });
    group.bench_function("key", |b| {
        let mut buf = [0u8; MAX_KEY_LEN];
        b.iter(|| black_box(&parsed).key(&mut buf).len())
    });
    group.bench_function("make_template", |b| {
        b.iter(|| wire::make_template(black_box(&response)))
    });
    group.bench_function("finish", |b| {
        b.iter(|| {
            wire::finish(
                black_box(&template),
                black_box(&parsed),
                TtlRewrite::Age(17),
                1232,
                &mut out,
            );
            out.len()
        })
    });
    group.bench_function("parse+key+finish", |b| {
        let mut buf = [0u8; MAX_KEY_LEN];
        b.iter(|| {
            let q = wire::parse_query(black_box(&query)).expect("query parses");
            let key_len = q.key(&mut buf).len();
            wire::finish(&template, &q, TtlRewrite::Age(17), q.udp_limit(), &mut out);
            key_len + out.len()
        })
    });
    group.finish();
}

/// A stand-in upstream resolver on 127.0.0.1: answers every question with 3 A
/// records (TTL 300). Only the cache fill goes to it.
async fn fake_upstream() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = socket.local_addr().expect("upstream address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = wire::parse_query(&buf[..len]) else {
                continue;
            };
            let mut resp = buf[..q.question_end].to_vec();
            resp[2] = 0x81; // QR, RD
            resp[3] = 0x80; // RA, NOERROR
            resp[4..12].copy_from_slice(&[0, 1, 0, 3, 0, 0, 0, 0]);
            for i in 0..3u8 {
                resp.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]); // name → question, A, IN
                resp.extend_from_slice(&300u32.to_be_bytes());
                resp.extend_from_slice(&[0, 4, 192, 0, 2, 10 + i]);
            }
            let _ = socket.send_to(&resp, peer).await;
        }
    });
    addr
}

fn engine_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let upstream = rt.block_on(fake_upstream());
    let text = format!(
        r#"
[consul]
dns = ["127.0.0.1:9"] # never asked: no Consul names are benchmarked

[dns]
listen = ["127.0.0.1:0"]
upstreams = ["{upstream}"]
wildcard_domain = ".apps.bench.test"
wildcard_targets = ["10.0.0.5"]
zones_dir = "/nonexistent/wayfinder-bench-zones"
"#
    );
    let file = wayfinder::config::parse(&text, "bench", &HashMap::<String, String>::new()).expect("config parses");
    let config = wayfinder::config::validate(&file, "bench").expect("config is valid");
    let shutdown = CancellationToken::new();
    let engine = {
        let _inside = rt.enter(); // the forwarders' sockets need the runtime
        Engine::new(
            &config.dns,
            &config.consul,
            LbAnswers::new(&config.dns.wildcard_targets, config.dns.wildcard_ttl),
            Arc::new(Zones::new(&config.dns.zones_dir)),
            Arc::new(DnsStats::default()),
            wayfinder::dns::forward::ReaderTasks {
                shutdown: shutdown.clone(),
                ..Default::default()
            },
        )
    };
    let src = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));

    // Fill the cache through the slow path, then check the fast path answers.
    let fill = |packet: &[u8], answers: usize| {
        let resp = rt
            .block_on(engine.resolve(packet, src, Transport::Udp))
            .expect("slow path answers");
        let m = Message::from_vec(&resp).expect("slow-path answer parses");
        assert_eq!(m.answers.len(), answers, "answers from the slow path");
        let mut out = Vec::with_capacity(512);
        assert!(matches!(
            engine.classify(packet, src, Transport::Udp, &mut out),
            Verdict::Answered
        ));
        assert_eq!(
            Message::from_vec(&out).expect("cached answer parses").answers.len(),
            answers
        );
    };
    let wildcard = client_query("x1.apps.bench.test.", RecordType::A, 0x1234);
    fill(&wildcard, 1);
    let cached = client_query("www.example.org.", RecordType::A, 0x1234);
    fill(&cached, 3);
    let many: Vec<Vec<u8>> = (0..1000)
        .map(|i| client_query(&format!("x{i}.apps.bench.test."), RecordType::A, i as u16))
        .collect();
    for q in &many {
        fill(q, 1);
    }

    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(512);
    group.bench_function("classify/wildcard_hit", |b| {
        b.iter(|| {
            let v = engine.classify(black_box(&wildcard), src, Transport::Udp, &mut out);
            matches!(v, Verdict::Answered)
        })
    });
    group.bench_function("classify/upstream_hit", |b| {
        b.iter(|| {
            let v = engine.classify(black_box(&cached), src, Transport::Udp, &mut out);
            matches!(v, Verdict::Answered)
        })
    });
    group.bench_function("classify/wildcard_hit_1000_names", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % many.len();
            let v = engine.classify(black_box(&many[i]), src, Transport::Udp, &mut out);
            matches!(v, Verdict::Answered)
        })
    });
    group.finish();
    shutdown.cancel();
}

criterion_group!(benches, wire_benches, engine_benches);
criterion_main!(benches);
