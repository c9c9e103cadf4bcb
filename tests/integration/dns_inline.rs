//! Consul questions asked by the UDP worker itself (`dns::inline`): many at once
//! through one worker, each answered with its own ID and 0x20 spelling; the
//! worker's pending table full (Consul frozen with SIGSTOP, so the questions
//! stay in flight): the rest go the task path and every answer is still right;
//! late and forged answers on the worker's Consul socket are ignored.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use socket2::{Domain, Protocol, Socket, Type};
use wayfinder::dns::stats::{AnswerSource, RouteSnapshot};

use crate::harness::{Consul, Wayfinder, consul_section, dig, eventually, unique};

const UPSTREAM: &str = "upstreams = [\"127.0.0.1:9\"]\n";
const A: u16 = 1;
const SRV: u16 = 33;

/// A query for `name` with `id`, EDNS (1232), its letters in random case:
/// the client's own 0x20, which the answer must echo.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 1]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        p.push(label.len() as u8);
        p.extend(label.bytes().map(|b| {
            if rand::random::<bool>() {
                b.to_ascii_uppercase()
            } else {
                b
            }
        }));
    }
    p.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    p.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    p
}

/// The question section of a packet, byte for byte.
fn question(packet: &[u8]) -> &[u8] {
    let mut pos = 12;
    while pos < packet.len() && packet[pos] != 0 {
        pos += 1 + usize::from(packet[pos]);
    }
    &packet[12..(pos + 5).min(packet.len())]
}

/// A client socket with room for every answer of a burst.
fn client() -> tokio::net::UdpSocket {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    socket.set_recv_buffer_size(4 << 20).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(socket.into()).unwrap()
}

/// Sends every query at once, then collects one answer per ID (a second
/// answer to an ID fails the test).
async fn ask_all(server: SocketAddr, queries: &HashMap<u16, Vec<u8>>, limit: Duration) -> HashMap<u16, Message> {
    let socket = client();
    for q in queries.values() {
        socket.send_to(q, server).await.unwrap();
    }
    let deadline = Instant::now() + limit;
    let mut answers = HashMap::new();
    let mut buf = vec![0u8; 65535];
    while answers.len() < queries.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (n, _) = tokio::time::timeout(left, socket.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{} of {} answered in {limit:?}", answers.len(), queries.len()))
            .unwrap();
        let resp = &buf[..n];
        let id = u16::from_be_bytes([resp[0], resp[1]]);
        let sent = queries
            .get(&id)
            .unwrap_or_else(|| panic!("an answer with an ID never sent: {id}"));
        assert_eq!(
            question(resp),
            question(sent),
            "ID {id}: the question as the client spelled it"
        );
        let message = Message::from_vec(resp).unwrap();
        assert!(answers.insert(id, message).is_none(), "two answers to ID {id}");
    }
    answers
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn srv_ports(m: &Message) -> Vec<u16> {
    let mut v: Vec<u16> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn consul_stats(wf: &Wayfinder) -> RouteSnapshot {
    wf.control.stats.route(AnswerSource::Consul)
}

/// 400 questions (20 services x A/SRV, ten times each, every one with its own
/// ID and spelling) sent at once to a single worker: every one is answered
/// right, with its ID and its spelling, by the worker's own exchanges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_questions_through_one_worker_keep_their_id_and_case() {
    let consul = Consul::shared();
    let prefix = unique("inl");
    for i in 0..20u16 {
        let svc = format!("{prefix}-{i}");
        for j in 1..=2 {
            consul.register(
                &format!("{svc}-{j}"),
                &svc,
                &format!("10.9.{i}.{j}"),
                7000 + i,
                &[],
                false,
            );
        }
    }
    for i in 0..20 {
        consul.wait_passing(&format!("{prefix}-{i}"), 2);
    }
    let wf = Wayfinder::start(&format!("{}[dns]\n{UPSTREAM}workers = 1\n", consul_section(consul))).await;
    let mut queries = HashMap::new();
    let mut expect = HashMap::new();
    for round in 0..10u16 {
        for i in 0..20u16 {
            for (k, qtype) in [A, SRV].into_iter().enumerate() {
                let id = round * 40 + i * 2 + k as u16;
                queries.insert(id, query(id, &format!("{prefix}-{i}.service.consul"), qtype));
                expect.insert(id, (i, qtype));
            }
        }
    }
    let answers = ask_all(wf.addr, &queries, Duration::from_secs(20)).await;
    for (id, m) in &answers {
        let (i, qtype) = expect[id];
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "ID {id}: {m:?}");
        if qtype == A {
            let want: Vec<Ipv4Addr> = (1..=2).map(|j| Ipv4Addr::new(10, 9, i as u8, j)).collect();
            assert_eq!(a_records(m), want, "ID {id}");
        } else {
            assert_eq!(srv_ports(m), [7000 + i, 7000 + i], "ID {id}");
        }
    }
    let stats = consul_stats(&wf);
    assert_eq!(stats.queries, 400);
    assert_eq!(stats.rcodes[0], 400);
    assert_eq!(stats.inline_overflow, 0, "{stats:?}");
    assert!(
        stats.inline_exchanges >= 40,
        "each of the 40 questions asked at least once: {stats:?}"
    );
    assert_eq!(
        stats.exchanges(),
        stats.inline_exchanges,
        "no exchange took the task path: {stats:?}"
    );
    wf.stop().await;
}

/// More questions in flight than the worker's table has slots (4; Consul
/// frozen, so none is answered before all are in): 4 are the worker's own,
/// the other 26 are counted and go the task path, and once Consul runs again
/// every one gets its own right answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_sends_the_rest_the_task_path_and_every_answer_is_right() {
    let consul = Consul::start();
    for i in 0..30u8 {
        consul.register(
            &format!("lim-{i}"),
            &format!("lim-{i}"),
            &format!("10.8.0.{i}"),
            80,
            &[],
            false,
        );
    }
    for i in 0..30 {
        consul.wait_passing(&format!("lim-{i}"), 1);
    }
    let wf = Wayfinder::start(&format!(
        "{}[dns]\n{UPSTREAM}workers = 1\nconsul_inline_slots = 4\nconsul_timeout = \"30s\"\n",
        consul_section(&consul)
    ))
    .await;
    let queries: HashMap<u16, Vec<u8>> = (0..30u16)
        .map(|i| (1000 + i, query(1000 + i, &format!("lim-{i}.service.consul"), A)))
        .collect();
    consul.pause();
    let asked = tokio::spawn({
        let addr = wf.addr;
        let queries = queries.clone();
        async move { ask_all(addr, &queries, Duration::from_secs(60)).await }
    });
    eventually(Duration::from_secs(20), "4 questions in the table, 26 over", || {
        let s = consul_stats(&wf);
        s.inline_exchanges == 4 && s.inline_overflow == 26
    })
    .await;
    consul.resume();
    let answers = asked.await.unwrap();
    for (id, m) in &answers {
        let i = (id - 1000) as u8;
        assert_eq!(a_records(m), [Ipv4Addr::new(10, 8, 0, i)], "ID {id}: {m:?}");
    }
    let stats = consul_stats(&wf);
    assert_eq!((stats.queries, stats.rcodes[0]), (30, 30), "{stats:?}");
    assert_eq!((stats.inline_exchanges, stats.inline_overflow), (4, 26), "{stats:?}");
    wf.stop().await;
}

/// The local UDP ports connected to `remote` (the worker's Consul socket),
/// from /proc/net/udp.
fn sockets_connected_to(remote: SocketAddr) -> Vec<u16> {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let want = format!("0100007F:{:04X}", remote.port());
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 3 && f[2] == want && f[3] == "01")
                .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// A response to `name` A with a random ID, the name in lower case, the
/// answer 6.6.6.6: what an off-path forger who knows the question sends.
fn forged_answer(name: &str) -> Vec<u8> {
    let mut p = rand::random::<u16>().to_be_bytes().to_vec();
    p.extend_from_slice(&[0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    p.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
    p
}

/// Sends `payload` to 127.0.0.1:`to` as if from 127.0.0.1:`from` (a raw
/// socket writes the UDP header itself; checksum 0 = none, RFC 768).
fn send_forged(from: u16, to: u16, payload: &[u8]) {
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("raw socket (runs as root)");
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&from.to_be_bytes());
    datagram.extend_from_slice(&to.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    raw.send_to(&datagram, &SocketAddr::from(([127, 0, 0, 1], to)).into())
        .unwrap();
}

/// Answers that are not the answer to a question in flight are ignored and
/// counted: 100 forged from Consul's own address and port (guessed ID, the
/// name not in the 0x20 spelling sent) while Consul is frozen, and Consul's
/// own answer after the question gave up (SERVFAIL at `consul_timeout`).
/// The client gets SERVFAIL, never the forged address, and the next question
/// is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_forged_answers_are_ignored() {
    let consul = Consul::start();
    consul.register("late-1", "late", "10.7.0.1", 80, &[], false);
    consul.wait_passing("late", 1);
    let wf = Wayfinder::start(&format!(
        "{}[dns]\n{UPSTREAM}workers = 1\nconsul_timeout = \"1s\"\n",
        consul_section(&consul)
    ))
    .await;
    let name = "late.service.consul";
    assert_eq!(dig(wf.addr, &[name, "A"]).await.answers(), ["10.7.0.1"]);
    let ports = sockets_connected_to(consul.dns_addr());
    assert!(!ports.is_empty(), "the worker's socket to Consul");
    let before = consul_stats(&wf);
    assert_eq!(before.inline_exchanges, 1, "{before:?}");

    consul.pause();
    let socket = client();
    let started = Instant::now();
    socket.send_to(&query(77, name, A), wf.addr).await.unwrap();
    for _ in 0..100 {
        for &port in &ports {
            send_forged(consul.dns_addr().port(), port, &forged_answer(name));
        }
    }
    let forged = 100 * ports.len() as u64;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let took = started.elapsed();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, 77);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{m:?}");
    assert!(m.answers.is_empty(), "a forged answer got through: {m:?}");
    assert!(
        took < Duration::from_secs(4),
        "SERVFAIL after {took:?} (consul_timeout 1s)"
    );

    // The worker reads its Consul socket while it has questions on the wire:
    // the forged datagrams and Consul's late answer are read (and ignored) by
    // the time the next questions are answered.
    consul.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(dig(wf.addr, &[name, "A"]).await.answers(), ["10.7.0.1"]);
        let s = consul_stats(&wf);
        if s.ignored_responses - before.ignored_responses > forged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{forged} forged and one late answer should be ignored: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wf.stop().await;
}
