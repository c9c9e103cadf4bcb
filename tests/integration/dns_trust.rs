//! Attacks on the dns component, each reproduced and shown refused (issue 11,
//! sections 3 and 4):
//!
//! - forwarded questions leave from a fresh random port with a random ID and a
//!   random 0x20 case, so an off-path forger has to guess all three; answers
//!   with a wrong ID, a wrong case or from another address are ignored while
//!   the real one is taken; an ICMP port-unreachable fails only its question;
//!   questions on the wire are bounded (`max_forwarded`);
//! - TCP: a client that pipelines questions and never reads is cut after
//!   `tcp_idle_timeout` and its slot given back; one source holds at most
//!   `tcp_connections_per_source` connections while others are served; clients
//!   outside `allow` are reset at accept and never hold a slot.
//!
//! The upstream here is a small UDP server in the test that records what it
//! receives (source port, ID, name as spelled) and answers as each test needs.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use wayfinder::dns::stats::{AnswerSource, TcpClose};

use crate::harness::{Unbound, Wayfinder, dig, eventually};

// ---------------------------------------------------------------------------
// Messages.

/// A query with RD set, as a stub resolver sends it.
fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn id_of(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[0], packet[1]])
}

fn rcode_of(packet: &[u8]) -> u8 {
    packet[3] & 0x0F
}

/// Offset just past the (uncompressed) question of a query.
fn question_end(q: &[u8]) -> usize {
    let mut pos = 12;
    while q[pos] != 0 {
        pos += 1 + q[pos] as usize;
    }
    pos + 5
}

/// The question name as spelled in `packet`.
fn spelled(packet: &[u8]) -> String {
    wayfinder::dns::wire::name_to_string(&packet[12..])
}

/// A response to `q` with ID `id`, the question `question` (wire, with type
/// and class) and one A record `ip` (TTL 300; owner: a pointer to the question).
fn reply(id: u16, question: &[u8], ip: [u8; 4]) -> Vec<u8> {
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&id.to_be_bytes());
    r.extend_from_slice(&0x8180u16.to_be_bytes()); // QR RD RA, NOERROR
    r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(question);
    r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
    r.extend_from_slice(&300u32.to_be_bytes());
    r.extend_from_slice(&[0, 4]);
    r.extend_from_slice(&ip);
    r
}

/// The true answer to `q`: its ID, its question as it came, `ip`.
fn true_reply(q: &[u8], ip: [u8; 4]) -> Vec<u8> {
    reply(id_of(q), &q[12..question_end(q)], ip)
}

/// The A addresses in a response.
fn addresses(packet: &[u8]) -> Vec<Ipv4Addr> {
    let m = Message::from_vec(packet).unwrap();
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A recording upstream.

/// One datagram the fake upstream received.
#[derive(Clone)]
struct Seen {
    from: SocketAddr,
    packet: Vec<u8>,
}

/// A UDP "upstream" on 127.0.0.1 run by a thread: it records every datagram and
/// hands it to `on_query` with its own socket (to answer from) and a second
/// socket on another port (to answer from the wrong address).
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// A handle on the upstream's socket, to answer later from the test.
    socket: StdUdpSocket,
    stop: Arc<AtomicBool>,
}

impl FakeUpstream {
    fn start(mut on_query: impl FnMut(&Seen, &StdUdpSocket, &StdUdpSocket) + Send + 'static) -> Self {
        let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let other = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = socket.try_clone().unwrap();
        {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let s = Seen {
                        from,
                        packet: buf[..n].to_vec(),
                    };
                    seen.lock().push(s.clone());
                    on_query(&s, &socket, &other);
                }
            });
        }
        FakeUpstream {
            addr,
            seen,
            socket: handle,
            stop,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().len()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn start_in_front_of(upstream: SocketAddr, extra: &str) -> Wayfinder {
    Wayfinder::start(&format!("[dns]\nupstreams = [\"{upstream}\"]\n{extra}")).await
}

/// Sends every query from one client socket and collects the replies by ID
/// until each has one or `wait` is over.
async fn ask_all(server: SocketAddr, queries: &[Vec<u8>], wait: Duration) -> HashMap<u16, (Vec<u8>, Duration)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    for q in queries {
        socket.send_to(q, server).await.unwrap();
    }
    let mut replies = HashMap::new();
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + wait;
    while replies.len() < queries.len() {
        match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                replies.insert(id_of(&buf[..n]), (buf[..n].to_vec(), started.elapsed()));
            }
            _ => break,
        }
    }
    replies
}

// ---------------------------------------------------------------------------
// Forwarded questions (issue 11 section 4).

/// draft-vixie-dnsext-dns0x20 and RFC 5452 section 9.2 (source port
/// randomisation): 200 questions for 200 names leave from (nearly) 200 source
/// ports, with 200 IDs and the letters of each name in random case; each
/// client still gets its answer with the question spelled as it asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_questions_leave_from_random_ports_with_random_ids_and_case() {
    let upstream = FakeUpstream::start(|s, socket, _| {
        let _ = socket.send_to(&true_reply(&s.packet, [192, 0, 2, 1]), s.from);
    });
    let wf = start_in_front_of(upstream.addr, "").await;
    let names: Vec<String> = (0..200).map(|i| format!("Host{i}.ExAmple.ORG.")).collect();
    let queries: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query(0x1000 + i as u16, n, RecordType::A))
        .collect();
    let replies = ask_all(wf.addr, &queries, Duration::from_secs(20)).await;
    assert_eq!(replies.len(), 200, "every question answered");
    for (i, name) in names.iter().enumerate() {
        let (r, _) = &replies[&(0x1000 + i as u16)];
        assert_eq!(rcode_of(r), 0, "{name}");
        assert_eq!(addresses(r), [Ipv4Addr::new(192, 0, 2, 1)], "{name}");
        assert_eq!(&spelled(r), name, "the client's spelling of the question is restored");
    }

    let seen = upstream.seen();
    assert_eq!(seen.len(), 200, "one upstream question per name");
    let ports: HashSet<u16> = seen.iter().map(|s| s.from.port()).collect();
    let ids: HashSet<u16> = seen.iter().map(|s| id_of(&s.packet)).collect();
    assert!(
        ports.len() >= 150,
        "only {} source ports for 200 questions",
        ports.len()
    );
    // 200 draws from 65536 IDs collide about 0.3 times on average.
    assert!(ids.len() >= 195, "only {} IDs for 200 questions", ids.len());
    let sent: HashSet<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    let mut recased = 0;
    for s in &seen {
        let name = spelled(&s.packet);
        assert!(sent.contains(&name.to_ascii_lowercase()), "{name} was not asked");
        if name != name.to_ascii_lowercase() && !names.contains(&name) {
            recased += 1;
        }
    }
    // Each name has 12 letters: all lower or the client's case by chance is 2/4096.
    assert!(recased >= 190, "only {recased} of 200 names sent in a case of our own");
    wf.stop().await;
}

/// RFC 5452 section 9.1 (accept an answer only if it matches the question,
/// ID and addresses) and 0x20: forged answers sent before the real one (wrong
/// ID; right ID but the name in another case; right ID and case but from
/// another port) are all ignored, the real answer is taken and cached. With
/// forgeries only, the client gets SERVFAIL, never a forged address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_answers_are_ignored_and_the_real_one_is_taken() {
    let upstream = FakeUpstream::start(|s, socket, other| {
        let q = &s.packet;
        let question = &q[12..question_end(q)];
        let id = id_of(q);
        let mut flipped = question.to_vec();
        for b in &mut flipped {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        let _ = socket.send_to(&reply(id ^ 0x5A5A, question, [6, 6, 6, 1]), s.from);
        let _ = socket.send_to(&reply(id, &flipped, [6, 6, 6, 2]), s.from);
        let _ = other.send_to(&reply(id, question, [6, 6, 6, 3]), s.from);
        if !spelled(q).to_ascii_lowercase().starts_with("forged-only.") {
            let _ = socket.send_to(&reply(id, question, [192, 0, 2, 7]), s.from);
        }
    });
    let wf = start_in_front_of(upstream.addr, "upstream_timeout = \"1s\"\nserve_stale = \"0s\"\n").await;
    let d = dig(wf.addr, &["target.example", "A"]).await;
    assert_eq!(d.answers(), ["192.0.2.7"], "{}", d.out);
    let again = dig(wf.addr, &["target.example", "A"]).await;
    assert_eq!(
        again.answers(),
        ["192.0.2.7"],
        "the cache holds the real answer: {}",
        again.out
    );
    assert_eq!(upstream.count(), 1);
    let stats = wf.control.stats.route(AnswerSource::Upstream);
    assert!(
        stats.ignored_responses >= 2,
        "wrong ID and wrong case counted as ignored: {stats:?}"
    );

    let d = dig(wf.addr, &["forged-only.example", "A"]).await;
    assert_eq!(d.status(), "SERVFAIL", "forged answers only: {}", d.out);
    assert!(d.answers().is_empty(), "{}", d.out);
    wf.stop().await;
}

/// An IPv4 ICMP port-unreachable (RFC 792, type 3 code 3) about the UDP
/// datagram `from` → `to`, as the upstream's host would send it.
fn port_unreachable(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only");
    };
    let mut inner = vec![0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 17, 0, 0];
    inner.extend_from_slice(&from.ip().octets());
    inner.extend_from_slice(&to.ip().octets());
    inner.extend_from_slice(&from.port().to_be_bytes());
    inner.extend_from_slice(&to.port().to_be_bytes());
    inner.extend_from_slice(&[0, 28, 0, 0]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&inner);
    let mut sum: u32 = icmp
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    icmp
}

/// RFC 1122 4.1.3.3 (ICMP errors are reported to the application) with one
/// socket per question: a port-unreachable about one question fails that
/// question at once (SERVFAIL long before the timeout), while five questions
/// in flight to the same upstream at the same moment are answered normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_port_unreachable_fails_only_its_question() {
    let raw = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::ICMPV4),
    )
    .expect("a raw ICMP socket (the tests run as root, see shared/notes/environment.md)");
    let held: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let upstream = {
        let held = held.clone();
        FakeUpstream::start(move |s, socket, _| {
            let name = spelled(&s.packet).to_ascii_lowercase();
            if name.starts_with("refused.") {
                let to = socket.local_addr().unwrap();
                let icmp = port_unreachable(s.from, to);
                raw.send_to(&icmp, &SocketAddr::from(([127, 0, 0, 1], 0)).into())
                    .expect("send ICMP");
            } else {
                held.lock().push(s.clone());
            }
        })
    };
    let wf = start_in_front_of(upstream.addr, "upstream_timeout = \"10s\"\nserve_stale = \"0s\"\n").await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..5u16 {
        let q = query(0x2000 + i, &format!("slow{i}.example."), RecordType::A);
        client.send_to(&q, wf.addr).await.unwrap();
    }
    eventually(Duration::from_secs(10), "the upstream holds 5 questions", || {
        held.lock().len() == 5
    })
    .await;
    let started = Instant::now();
    client
        .send_to(&query(0x2100, "refused.example.", RecordType::A), wf.addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(9), client.recv_from(&mut buf))
        .await
        .expect("an answer before the 10 s timeout")
        .unwrap();
    assert_eq!(id_of(&buf[..n]), 0x2100, "the refused question is answered first");
    assert_eq!(rcode_of(&buf[..n]), 2, "SERVFAIL");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SERVFAIL took {:?}: the ICMP error was not seen",
        started.elapsed()
    );
    // Now the held questions are answered: each still has its own socket.
    for s in held.lock().iter() {
        upstream
            .socket
            .send_to(&true_reply(&s.packet, [192, 0, 2, 5]), s.from)
            .unwrap();
    }
    let mut answered = HashSet::new();
    while answered.len() < 5 {
        let (n, _) = tokio::time::timeout(Duration::from_secs(9), client.recv_from(&mut buf))
            .await
            .expect("the other questions are answered")
            .unwrap();
        let r = &buf[..n];
        assert_eq!(rcode_of(r), 0, "question {:#x} failed with the refused one", id_of(r));
        assert_eq!(addresses(r), [Ipv4Addr::new(192, 0, 2, 5)]);
        answered.insert(id_of(r));
    }
    wf.stop().await;
}

/// Resources are bounded: with `max_forwarded = 4` and a silent upstream, four
/// questions are on the wire, the next ones get SERVFAIL at once without
/// reaching the upstream, and once the four time out a new question goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_on_the_wire_are_bounded() {
    let upstream = FakeUpstream::start(|_, _, _| {});
    let wf = start_in_front_of(
        upstream.addr,
        "max_forwarded = 4\nupstream_timeout = \"6s\"\nserve_stale = \"0s\"\n",
    )
    .await;
    let first: Vec<Vec<u8>> = (0..4u16)
        .map(|i| query(0x3000 + i, &format!("held{i}.example."), RecordType::A))
        .collect();
    let held = tokio::spawn(async move { ask_all(wf.addr, &first, Duration::from_secs(20)).await });
    eventually(Duration::from_secs(10), "4 questions on the wire", || {
        upstream.count() == 4
    })
    .await;
    let over: Vec<Vec<u8>> = (0..6u16)
        .map(|i| query(0x3100 + i, &format!("over{i}.example."), RecordType::A))
        .collect();
    let replies = ask_all(wf.addr, &over, Duration::from_secs(5)).await;
    assert_eq!(replies.len(), 6, "the questions over the limit are answered at once");
    for (r, took) in replies.values() {
        assert_eq!(rcode_of(r), 2, "SERVFAIL");
        assert!(*took < Duration::from_secs(5), "took {took:?}");
    }
    assert_eq!(upstream.count(), 4, "nothing over the limit reached the upstream");
    assert_eq!(wf.control.stats.route(AnswerSource::Upstream).over_limit, 6);
    let held = held.await.unwrap();
    assert_eq!(held.len(), 4);
    assert!(held.values().all(|(r, _)| rcode_of(r) == 2), "the held ones time out");
    let d = dig(wf.addr, &["after.example", "A", "+time=1"]).await;
    assert_eq!(d.status(), "TIMEOUT", "the silent upstream does not answer: {}", d.out);
    eventually(Duration::from_secs(10), "a fifth question on the wire", || {
        upstream.count() == 5
    })
    .await;
    wf.stop().await;
}

// ---------------------------------------------------------------------------
// DNS over TCP (issue 11 section 3).

/// A TCP connection from `source` (any 127.0.0.0/8 address is local) that
/// resets on drop, so hundreds of them leave no TIME_WAIT behind.
async fn connect_from(source: [u8; 4], server: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    try_connect_from(source, server, rcvbuf).await.unwrap()
}

/// [`connect_from`], which may see the server's reset already (connect reads
/// the socket's error once the handshake is done).
async fn try_connect_from(source: [u8; 4], server: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket2::SockRef::from(&socket)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(server).await
}

fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = (msg.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(msg);
    f
}

#[derive(Debug, PartialEq, Eq)]
enum Tcp {
    Answer(Vec<u8>),
    Closed,
    Silent,
}

async fn tcp_read(stream: &mut TcpStream, wait: Duration) -> Tcp {
    let read = async {
        let Ok(len) = stream.read_u16().await else {
            return Tcp::Closed;
        };
        let mut msg = vec![0u8; len as usize];
        match stream.read_exact(&mut msg).await {
            Ok(_) => Tcp::Answer(msg),
            Err(_) => Tcp::Closed,
        }
    };
    tokio::time::timeout(wait, read).await.unwrap_or(Tcp::Silent)
}

/// Asks `name` A on `stream` and reads one reply.
async fn tcp_ask(stream: &mut TcpStream, id: u16, name: &str) -> Tcp {
    if stream.write_all(&frame(&query(id, name, RecordType::A))).await.is_err() {
        return Tcp::Closed;
    }
    tcp_read(stream, Duration::from_secs(5)).await
}

/// The wildcard name every TCP test asks (a local answer).
const LOCAL: &str = "x.apps.example.com.";
const LOCAL_CONFIG: &str = "wildcard_domain = \".apps.example.com\"\nwildcard_targets = [\"10.0.0.5\"]\n";

/// RFC 7766 6.2.3 (servers may close connections to manage resources) and
/// 6.2.1.1 (pipelining): a client that pipelines questions for a large answer
/// and never reads fills the socket buffers; the answer it leaves unread for
/// `tcp_idle_timeout` (2 s) cuts it, and its slot (one per source here) is free
/// for the next connection from that source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_never_read_are_cut_and_free_their_slot() {
    let records: Vec<String> = (0..60)
        .map(|i| format!("big.test. 300 IN TXT \\\"{i:02}{}\\\"", "x".repeat(200)))
        .collect();
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let upstream = Unbound::start(&refs);
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"{}\"]\ntcp_idle_timeout = \"2s\"\ntcp_connections_per_source = 1\n{LOCAL_CONFIG}",
        upstream.addr
    ))
    .await;
    let warm = dig(wf.addr, &["big.test", "TXT", "+tcp"]).await;
    assert_eq!(warm.section("ANSWER").len(), 60, "{}", warm.out);

    // 2000 questions for a 12 KB answer: 24 MB of answers, far more than the
    // socket buffers hold for a client whose receive buffer is 4 KiB.
    let source = [127, 0, 0, 5];
    let attacker = connect_from(source, wf.addr, Some(4096)).await;
    let (mut reader, mut writer) = attacker.into_split();
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut bytes = Vec::new();
        for i in 0..2000u16 {
            bytes.extend(frame(&query(i, "big.test.", RecordType::TXT)));
        }
        let _ = writer.write_all(&bytes).await;
        writer
    });
    let stats = wf.control.stats.clone();
    eventually(Duration::from_secs(30), "the stalled client is cut", || {
        stats.tcp_closed(TcpClose::SlowReader) == 1
    })
    .await;
    let cut_after = started.elapsed();
    assert!(
        cut_after >= Duration::from_secs(2),
        "cut before the timeout: {cut_after:?}"
    );
    // The attacker sees its connection reset once it reads what was delivered.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 65536];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the cut connection still delivers data");
    drop(flood.await.unwrap());
    // The slot is free: the same source is served again.
    let mut next = connect_from(source, wf.addr, None).await;
    match tcp_ask(&mut next, 0x4001, LOCAL).await {
        Tcp::Answer(r) => assert_eq!(rcode_of(&r), 0),
        other => panic!("the source's slot was not given back: {other:?}"),
    }
    wf.stop().await;
}

/// RFC 7766 6.2.2 (servers should limit connections per client): with
/// `tcp_connections_per_source = 4`, four connections from one address are
/// served, a fifth is reset, another address and a plain dig are served
/// meanwhile, and closing one of the four lets a new one in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_per_source_are_capped() {
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"192.0.2.53\"]\ntcp_connections_per_source = 4\n{LOCAL_CONFIG}"
    ))
    .await;
    let crowd = [127, 0, 0, 6];
    let mut held = Vec::new();
    for i in 0..4u16 {
        let mut s = connect_from(crowd, wf.addr, None).await;
        let r = tcp_ask(&mut s, 0x5000 + i, LOCAL).await;
        assert!(matches!(r, Tcp::Answer(_)), "connection {i} of 4: {r:?}");
        held.push(s);
    }
    let fifth = match try_connect_from(crowd, wf.addr, None).await {
        Ok(mut extra) => tcp_ask(&mut extra, 0x5010, LOCAL).await,
        Err(_) => Tcp::Closed,
    };
    assert_eq!(fifth, Tcp::Closed, "a fifth from one source");
    assert_eq!(wf.control.stats.tcp_closed(TcpClose::PerSource), 1);

    let mut neighbour = connect_from([127, 0, 0, 7], wf.addr, None).await;
    assert!(matches!(tcp_ask(&mut neighbour, 0x5020, LOCAL).await, Tcp::Answer(_)));
    let d = dig(wf.addr, &["x.apps.example.com", "A", "+tcp"]).await;
    assert_eq!(d.answers(), ["10.0.0.5"], "{}", d.out);
    for s in &mut held {
        assert!(
            matches!(tcp_ask(s, 0x5030, LOCAL).await, Tcp::Answer(_)),
            "the four stay served"
        );
    }

    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = try_connect_from(crowd, wf.addr, None).await
            && matches!(tcp_ask(&mut s, 0x5040, LOCAL).await, Tcp::Answer(_))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection did not give its slot back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wf.stop().await;
}

/// RFC 1035 4.1.1 REFUSED stays the UDP answer; over TCP a client outside
/// `allow` is reset at accept, before it takes a slot: a hundred such clients
/// that send nothing are all gone at once (not after the idle timeout), and a
/// client inside `allow` is served beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_outside_allow_never_hold_a_slot() {
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"192.0.2.53\"]\nallow = [\"127.0.0.1/32\"]\n{LOCAL_CONFIG}"
    ))
    .await;
    let outside = [127, 0, 0, 9];
    let mut strangers = Vec::new();
    for i in 0..100 {
        match try_connect_from(outside, wf.addr, None).await {
            Ok(s) => strangers.push(s),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "stranger {i}"),
        }
    }
    for (i, s) in strangers.iter_mut().enumerate() {
        assert_eq!(
            tcp_read(s, Duration::from_secs(3)).await,
            Tcp::Closed,
            "stranger {i} still connected"
        );
    }
    assert_eq!(wf.control.stats.tcp_closed(TcpClose::NotAllowed), 100);
    let d = dig(wf.addr, &["x.apps.example.com", "A", "+tcp"]).await;
    assert_eq!(d.answers(), ["10.0.0.5"], "{}", d.out);
    let d = dig(wf.addr, &["-b", "127.0.0.9", "x.apps.example.com", "A", "+notcp"]).await;
    assert_eq!(d.status(), "REFUSED", "UDP from outside: {}", d.out);
    wf.stop().await;
}

/// The host's own addresses are always clients, whatever `allow` says (its
/// queries to the docker bridge can arrive masqueraded from its outward
/// address): from this host's non-loopback address a UDP and a TCP question
/// are answered with `allow` naming neither it nor loopback, while loopback
/// itself (not an interface address: `allow`'s to decide) stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_own_addresses_are_always_clients() {
    let own = wayfinder::net::host::interface_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .expect("this test needs a non-loopback IPv4 interface address (ip -brief address)");
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"192.0.2.53\"]\nallow = [\"198.51.100.0/24\"]\n{LOCAL_CONFIG}"
    ))
    .await;
    let source = own.to_string();
    for transport in ["+notcp", "+tcp"] {
        let d = dig(wf.addr, &["-b", &source, "x.apps.example.com", "A", transport]).await;
        assert_eq!(d.answers(), ["10.0.0.5"], "from {source} {transport}: {}", d.out);
    }
    let d = dig(wf.addr, &["x.apps.example.com", "A", "+notcp"]).await;
    assert_eq!(d.status(), "REFUSED", "from loopback, outside allow: {}", d.out);
    wf.stop().await;
}
