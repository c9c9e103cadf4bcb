//! Hostile and malformed packets over raw UDP and TCP sockets: random bytes,
//! truncated headers, bad names, compression loops, wrong counts, unknown opcodes,
//! EDNS misuse and misbehaving TCP clients. Where the RFCs define an answer
//! (FORMERR, NOTIMP, BADVERS, REFUSED) it is checked byte for byte; where they do
//! not, the packet must go unanswered. After every barrage the server still
//! answers the wildcard domain (local) and `www.test` (upstream), over UDP and TCP.
//! One test turns it around: malformed replies from an upstream.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::harness::{Unbound, Wayfinder, dig};

const QR: u16 = 0x8000;
const RD: u16 = 0x0100;
const TYPE_A: u16 = 1;
const TYPE_OPT: u16 = 41;
const FORMERR: u8 = 1;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;
/// The ID of the well-formed probe sent after packets that must stay unanswered.
const PROBE_ID: u16 = 0xBEEF;

// ---------------------------------------------------------------------------
// The server under test.

/// An unbound upstream (`www.test. A 192.0.2.10`) and Wayfinder in front of it,
/// with the wildcard domain `.apps.example.com` answered with `10.0.0.5`.
struct Server {
    upstream: Unbound,
    wf: Wayfinder,
}

impl Server {
    async fn start(extra: &str) -> Self {
        let upstream = Unbound::start(&["www.test. 300 IN A 192.0.2.10"]);
        // These tests open hundreds of connections from 127.0.0.1 at once; the
        // per-source cap has its own test (dns_trust.rs).
        let config = format!(
            "[dns]\nupstreams = [\"{}\"]\nwildcard_domain = \".apps.example.com\"\n\
             wildcard_targets = [\"10.0.0.5\"]\ntcp_connections_per_source = 1024\n{extra}",
            upstream.addr
        );
        let wf = Wayfinder::start(&config).await;
        Server { upstream, wf }
    }

    fn addr(&self) -> SocketAddr {
        self.wf.addr
    }

    /// The server still answers a local and an upstream name, over UDP and TCP.
    async fn assert_still_serving(&self, after: &str) {
        for transport in ["+notcp", "+tcp"] {
            for (name, want) in [("x.apps.example.com", "10.0.0.5"), ("www.test", "192.0.2.10")] {
                let d = dig(self.addr(), &[name, "A", transport]).await;
                assert_eq!(
                    d.answers(),
                    [want],
                    "after {after}: {name} {transport} no longer answered:\n{}",
                    d.out
                );
            }
        }
    }

    async fn stop(self) {
        self.wf.stop().await;
        drop(self.upstream);
    }
}

// ---------------------------------------------------------------------------
// Packet builders (by hand: most of these packets are ones a DNS library refuses
// to write).

fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    [id, flags, qd, an, ns, ar]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect()
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// QNAME (wire form) + QTYPE + QCLASS IN.
fn question_wire(name: &[u8], qtype: u16) -> Vec<u8> {
    let mut out = name.to_vec();
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out
}

/// A standard query with RD.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = header(id, RD, 1, 0, 0, 0);
    p.extend(question_wire(&wire_name(name), qtype));
    p
}

/// An OPT record (RFC 6891 6.1.2) owned by the root.
fn opt_record(payload: u16, version: u8) -> Vec<u8> {
    let mut r = vec![0];
    r.extend_from_slice(&TYPE_OPT.to_be_bytes());
    r.extend_from_slice(&payload.to_be_bytes());
    r.extend_from_slice(&[0, version, 0, 0]); // extended RCODE, VERSION, flags
    r.extend_from_slice(&[0, 0]); // RDLEN
    r
}

/// A query carrying `opts` OPT records in the additional section.
fn query_with_opts(id: u16, name: &str, version: u8, opts: u16) -> Vec<u8> {
    let mut p = header(id, RD, 1, 0, 0, opts);
    p.extend(question_wire(&wire_name(name), TYPE_A));
    for _ in 0..opts {
        p.extend(opt_record(1232, version));
    }
    p
}

/// A resource record with a raw owner name and an empty RDATA of type A's class IN.
fn raw_record(owner: &[u8], rtype: u16) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&60u32.to_be_bytes());
    r.extend_from_slice(&[0, 0]);
    r
}

/// RFC 7766 8: two-octet length, then the message.
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

// ---------------------------------------------------------------------------
// Response inspection.

fn id_of(resp: &[u8]) -> u16 {
    u16::from_be_bytes([resp[0], resp[1]])
}

fn flags_of(resp: &[u8]) -> u16 {
    u16::from_be_bytes([resp[2], resp[3]])
}

fn rcode_of(resp: &[u8]) -> u8 {
    resp[3] & 0x0F
}

fn count(resp: &[u8], index: usize) -> u16 {
    u16::from_be_bytes([resp[4 + 2 * index], resp[5 + 2 * index]])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// A response with QR set, the request's ID and `rcode`.
fn assert_error(resp: &[u8], request: &[u8], rcode: u8, what: &str) {
    assert!(resp.len() >= 12, "{what}: short response {}", hex(resp));
    assert_eq!(id_of(resp), id_of(request), "{what}: ID not echoed: {}", hex(resp));
    assert!(flags_of(resp) & QR != 0, "{what}: QR not set: {}", hex(resp));
    assert_eq!(rcode_of(resp), rcode, "{what}: wrong RCODE: {}", hex(resp));
    assert_eq!(count(resp, 1), 0, "{what}: an error has no answers: {}", hex(resp));
}

/// Any response to anything: a header with QR set that a DNS library can read.
fn assert_well_formed(resp: &[u8], what: &str) {
    assert!(resp.len() >= 12, "{what}: short response {}", hex(resp));
    assert!(flags_of(resp) & QR != 0, "{what}: QR not set: {}", hex(resp));
    if let Err(e) = Message::from_vec(resp) {
        panic!("{what}: response does not parse ({e}): {}", hex(resp));
    }
}

// ---------------------------------------------------------------------------
// Transports.

/// One UDP question and its answer, if one comes within `wait`.
async fn udp_ask(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    sock.send(packet).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(wait, sock.recv(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn udp_answer(server: SocketAddr, packet: &[u8], what: &str) -> Vec<u8> {
    udp_ask(server, packet, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("{what}: no UDP answer"))
}

/// Sends `packets` and then a well-formed probe from one socket (so one server
/// worker reads them in order): the first datagram back must be the probe's
/// answer, and nothing else may arrive for a while after it.
async fn udp_expect_silence(server: SocketAddr, packets: &[Vec<u8>], what: &str) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    for p in packets {
        sock.send(p).await.unwrap();
    }
    sock.send(&query(PROBE_ID, "probe.apps.example.com", TYPE_A))
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: the probe after the packets was not answered"))
        .unwrap();
    assert_eq!(
        id_of(&buf[..n]),
        PROBE_ID,
        "{what}: must not be answered, got {}",
        hex(&buf[..n])
    );
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await {
        panic!("{what}: must not be answered, got {}", hex(&buf[..n]));
    }
}

/// What a TCP client sees after writing.
#[derive(Debug, PartialEq, Eq)]
enum Tcp {
    /// One length-prefixed message.
    Answer(Vec<u8>),
    /// The server closed (or reset) the connection without a (complete) message.
    Closed,
    /// Nothing happened within the wait.
    Silent,
}

impl Tcp {
    fn answer(self, what: &str) -> Vec<u8> {
        match self {
            Tcp::Answer(a) => a,
            other => panic!("{what}: wanted a TCP answer, got {other:?}"),
        }
    }
}

async fn tcp_read(stream: &mut TcpStream, wait: Duration) -> Tcp {
    let read = async {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return Tcp::Closed;
        }
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        match stream.read_exact(&mut msg).await {
            Ok(_) => Tcp::Answer(msg),
            Err(_) => Tcp::Closed,
        }
    };
    tokio::time::timeout(wait, read).await.unwrap_or(Tcp::Silent)
}

/// A TCP connection that resets on drop instead of lingering in TIME_WAIT: these
/// tests open hundreds, and a client port left in TIME_WAIT cannot be bound by a
/// Wayfinder starting meanwhile in another test (see `DnsSockets::bind`).
async fn connect(server: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(server).await.unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    stream
}

/// Connects, writes `bytes` verbatim (the caller frames them) and reads one reply.
async fn tcp_exchange(server: SocketAddr, bytes: &[u8], wait: Duration) -> Tcp {
    let mut stream = connect(server).await;
    stream.write_all(bytes).await.unwrap();
    tcp_read(&mut stream, wait).await
}

async fn tcp_answer(server: SocketAddr, msg: &[u8], what: &str) -> Vec<u8> {
    tcp_exchange(server, &frame(msg), Duration::from_secs(3))
        .await
        .answer(what)
}

/// Asks `msg` over UDP and over TCP and checks both replies with `check`.
async fn both_transports(server: SocketAddr, msg: &[u8], what: &str, check: impl Fn(&[u8], &str)) {
    let udp = udp_answer(server, msg, what).await;
    check(&udp, &format!("{what} (udp)"));
    let tcp = tcp_answer(server, msg, what).await;
    check(&tcp, &format!("{what} (tcp)"));
}

// ---------------------------------------------------------------------------
// Random input.

/// xorshift64*: deterministic, so a failure replays with the same packets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Fully random bytes of random length 0..600, a plausible query header over
/// random bytes, or a well-formed query with a few bytes overwritten, cut short
/// or extended: the last two reach the question and record parsers.
fn random_packet(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        0 | 1 => {
            let len = rng.below(600);
            rng.bytes(len)
        }
        2 => {
            let flags = (rng.next() as u16) & !(QR | 0x7800);
            let counts = [rng.below(3) as u16, rng.below(3) as u16, rng.below(3) as u16];
            let mut p = header(rng.next() as u16, flags, 1, counts[0], counts[1], counts[2]);
            let len = rng.below(300);
            p.extend(rng.bytes(len));
            p
        }
        _ => {
            let id = rng.next() as u16;
            let mut p = match rng.below(4) {
                0 => query(id, "x.apps.example.com", TYPE_A),
                1 => query_with_opts(id, "www.test", 0, 1),
                2 => query_with_opts(id, "y.apps.example.com", 0, 1),
                _ => {
                    // An additional record whose owner points back at the question.
                    let mut p = header(id, RD, 1, 0, 0, 1);
                    p.extend(question_wire(&wire_name("z.apps.example.com"), TYPE_A));
                    p.extend(raw_record(&[0xC0, 0x0C], TYPE_A));
                    p
                }
            };
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(p.len());
                p[at] = rng.next() as u8;
            }
            match rng.below(4) {
                0 => {
                    let len = rng.below(p.len());
                    p.truncate(len);
                }
                1 => {
                    let len = rng.below(64);
                    p.extend(rng.bytes(len));
                }
                _ => {}
            }
            p
        }
    }
}

/// Whether a packet could be answered at all: a full header with QR clear.
fn answerable(p: &[u8]) -> bool {
    p.len() >= 12 && flags_of(p) & QR == 0
}

// ---------------------------------------------------------------------------
// Tests.

/// RFC 1035 4.1.1: a message is a 12-octet header and sections described by it;
/// nothing a peer sends may crash or wedge the server. 4000 random and mutated
/// datagrams (lengths 0..600) from eight sockets: every reply is a well-formed
/// response (QR set) to a packet that had a query header, and the server still
/// answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_datagrams_never_hurt_the_server() {
    let server = Server::start("").await;
    let mut rng = Rng(0x5EED_0001_D15C_0DE5);
    let mut sockets = Vec::new();
    for _ in 0..8 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.connect(server.addr()).await.unwrap();
        sockets.push(Arc::new(s));
    }
    let mut eligible_ids = HashSet::new();
    let mut eligible = 0usize;
    let received = Arc::new(parking_lot::Mutex::new(Vec::<Vec<u8>>::new()));
    let mut readers = Vec::new();
    for s in &sockets {
        let s = s.clone();
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            // Read until the server has been quiet for a second.
            while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await {
                received.lock().push(buf[..n].to_vec());
            }
        }));
    }
    for i in 0..4000 {
        let p = random_packet(&mut rng);
        if answerable(&p) {
            eligible += 1;
            eligible_ids.insert(id_of(&p));
        }
        sockets[i % sockets.len()].send(&p).await.unwrap();
        if i % 100 == 99 {
            // Stay below the socket buffers: this is about content, not load.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for r in readers {
        r.await.unwrap();
    }
    let received = std::mem::take(&mut *received.lock());
    assert!(!received.is_empty(), "no random packet was answered at all");
    assert!(
        received.len() <= eligible,
        "{} replies to {eligible} queries",
        received.len()
    );
    for resp in received.iter() {
        assert_well_formed(resp, "reply to a random datagram");
        assert!(
            eligible_ids.contains(&id_of(resp)),
            "reply with an ID no query-shaped packet had: {}",
            hex(resp)
        );
    }
    server.assert_still_serving("4000 random datagrams").await;
    server.stop().await;
}

/// RFC 7766 8 (length-prefixed messages) with RFC 1035 4.1.1 content: 600 random
/// and mutated messages, each on its own connection, 32 connections at a time.
/// Every reply is a well-formed response, connections end, the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tcp_messages_never_hurt_the_server() {
    let server = Server::start("").await;
    let addr = server.addr();
    let mut rng = Rng(0x5EED_0002_7C9D_0DE5);
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let p = random_packet(&mut rng);
        let permit = limit.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let _permit = permit;
            let reply = tcp_exchange(addr, &frame(&p), Duration::from_secs(5)).await;
            (p, reply)
        });
    }
    let mut answered = 0;
    while let Some(done) = tasks.join_next().await {
        let (p, reply) = done.unwrap();
        match reply {
            Tcp::Answer(resp) => {
                answered += 1;
                assert!(answerable(&p), "answered a non-query {}: {}", hex(&p), hex(&resp));
                assert_eq!(id_of(&resp), id_of(&p), "ID of {}", hex(&p));
                assert_well_formed(&resp, &format!("reply to {}", hex(&p)));
            }
            Tcp::Closed => {}
            Tcp::Silent => panic!("no reply and no close within 5 s for {}", hex(&p)),
        }
    }
    assert!(answered > 0, "no random message was answered at all");
    server.assert_still_serving("600 random TCP messages").await;
    server.stop().await;
}

/// RFC 1035 4.1.1: the header is 12 octets; anything shorter has no ID to answer
/// to and is dropped silently (UDP), or ends the connection (TCP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_headers_are_dropped() {
    let server = Server::start("").await;
    let full = query(0x1111, "x.apps.example.com", TYPE_A);
    let short: Vec<Vec<u8>> = (0..12).map(|n| full[..n].to_vec()).collect();
    udp_expect_silence(server.addr(), &short, "headers of 0..11 bytes").await;
    for p in &short {
        let reply = tcp_exchange(server.addr(), &frame(p), Duration::from_secs(3)).await;
        assert_eq!(reply, Tcp::Closed, "a {}-byte TCP message", p.len());
    }
    server.assert_still_serving("truncated headers").await;
    server.stop().await;
}

/// RFC 1035 4.1.1 (RCODE 1, format error): a header claiming one question with no
/// question bytes after it gets FORMERR with the same ID; on TCP the connection
/// stays usable for the next query (RFC 7766 6.2.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn question_count_without_question_is_formerr() {
    let server = Server::start("").await;
    let bare = header(0x2222, RD, 1, 0, 0, 0);
    both_transports(server.addr(), &bare, "QDCOUNT=1, no question", |r, w| {
        assert_error(r, &bare, FORMERR, w)
    })
    .await;
    // Half a question: the name, but no type and class.
    let mut half = header(0x2223, RD, 1, 0, 0, 0);
    half.extend(wire_name("x.apps.example.com"));
    both_transports(server.addr(), &half, "question without type", |r, w| {
        assert_error(r, &half, FORMERR, w)
    })
    .await;

    let mut stream = connect(server.addr()).await;
    let good = query(0x2224, "x.apps.example.com", TYPE_A);
    let mut both = frame(&bare);
    both.extend(frame(&good));
    stream.write_all(&both).await.unwrap();
    let first = tcp_read(&mut stream, Duration::from_secs(3))
        .await
        .answer("FORMERR on a kept connection");
    assert_error(&first, &bare, FORMERR, "first of two pipelined messages");
    let second = tcp_read(&mut stream, Duration::from_secs(3))
        .await
        .answer("query after a FORMERR on the same connection");
    assert_eq!(id_of(&second), 0x2224);
    assert_eq!(rcode_of(&second), 0);
    assert_eq!(count(&second, 1), 1, "{}", hex(&second));
    server.assert_still_serving("bare headers").await;
    server.stop().await;
}

/// RFC 1035 4.1.4: a compression pointer refers to a *prior* occurrence of a name;
/// in the question nothing but the header precedes the name, so a pointer there
/// (to itself, into the header, or after a label back to the name's start) is a
/// format error: FORMERR with the same ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_question_name_is_formerr() {
    let server = Server::start("").await;
    for (i, name) in [
        &[0xC0u8, 0x0C][..],
        &[0xC0, 0x00],
        &[0x01, b'x', 0xC0, 0x0C],
        &[0x01, b'x', 0xC0, 0xFF],
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = header(0x3300 + i as u16, RD, 1, 0, 0, 0);
        p.extend(question_wire(name, TYPE_A));
        let what = format!("question name {}", hex(name));
        both_transports(server.addr(), &p, &what, |r, w| assert_error(r, &p, FORMERR, w)).await;
    }
    server.assert_still_serving("compressed question names").await;
    server.stop().await;
}

/// RFC 1035 4.1.4: pointers must lead to a prior name, so a pointer to itself, a
/// pair of records pointing at each other and a pointer past the end are format
/// errors (FORMERR, same ID) and never make the server loop. A legitimate pointer
/// back to the question name is accepted (control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_loop_in_additional_section_is_formerr() {
    let server = Server::start("").await;
    let question = question_wire(&wire_name("x.apps.example.com"), TYPE_A);
    let first_rr = 12 + question.len();
    assert!(first_rr + 20 < 0x3FFF);

    let mut self_loop = header(0x4401, RD, 1, 0, 0, 1);
    self_loop.extend(&question);
    self_loop.extend(raw_record(&[0xC0, first_rr as u8], TYPE_A));

    // Record 1's owner points at record 2's owner, which points back at record 1.
    let second_rr = first_rr + raw_record(&[0xC0, 0], TYPE_A).len();
    let mut pair = header(0x4402, RD, 1, 0, 0, 2);
    pair.extend(&question);
    pair.extend(raw_record(&[0xC0, second_rr as u8], TYPE_A));
    pair.extend(raw_record(&[0xC0, first_rr as u8], TYPE_A));

    let mut past_end = header(0x4403, RD, 1, 0, 0, 1);
    past_end.extend(&question);
    past_end.extend(raw_record(&[0x3F, 0xFF], TYPE_A));

    // A label, then a pointer back to that label: a loop through a label.
    let mut label_loop = header(0x4404, RD, 1, 0, 0, 1);
    label_loop.extend(&question);
    label_loop.extend(raw_record(&[0x01, b'a', 0xC0, first_rr as u8], TYPE_A));

    for (what, p) in [
        ("pointer to itself", &self_loop),
        ("two records pointing at each other", &pair),
        ("pointer past the end", &past_end),
        ("label then pointer back to it", &label_loop),
    ] {
        both_transports(server.addr(), p, what, |r, w| assert_error(r, p, FORMERR, w)).await;
    }

    let mut fine = header(0x4405, RD, 1, 0, 0, 1);
    fine.extend(&question);
    fine.extend(raw_record(&[0xC0, 0x0C], TYPE_A));
    both_transports(server.addr(), &fine, "pointer to the question name", |r, w| {
        assert_eq!(rcode_of(r), 0, "{w}: {}", hex(r));
        assert_eq!(id_of(r), 0x4405, "{w}");
        assert_eq!(count(r, 1), 1, "{w}: {}", hex(r));
    })
    .await;
    server.assert_still_serving("compression loops").await;
    server.stop().await;
}

/// RFC 1035 2.3.4 and 3.1: labels are 63 octets or less, names 255 octets or less.
/// A 64-octet label and a 256-octet name are FORMERR (same ID); a name of exactly
/// 255 octets under the wildcard domain is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_labels_and_names_are_formerr() {
    let server = Server::start("").await;
    let suffix = wire_name("apps.example.com");

    let mut label64 = vec![64];
    label64.extend([b'a'; 64]);
    label64.extend(&suffix);

    // Labels of 63 until the name, root included, has `total` octets.
    let long_name = |total: usize| {
        let mut name = Vec::new();
        let mut room = total - suffix.len();
        while room > 0 {
            let label = (room - 1).min(63);
            assert!(label > 0, "cannot pad to {total}");
            name.push(label as u8);
            name.extend(std::iter::repeat_n(b'b', label));
            room -= label + 1;
        }
        name.extend(&suffix);
        assert_eq!(name.len(), total);
        name
    };

    for (i, (what, name)) in [
        ("a 64-octet label", label64),
        ("a 256-octet name", long_name(256)),
        ("a 300-octet name", long_name(300)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = header(0x5500 + i as u16, RD, 1, 0, 0, 0);
        p.extend(question_wire(&name, TYPE_A));
        both_transports(server.addr(), &p, what, |r, w| assert_error(r, &p, FORMERR, w)).await;
    }

    let mut max = header(0x55FF, RD, 1, 0, 0, 0);
    let name = long_name(255);
    max.extend(question_wire(&name, TYPE_A));
    both_transports(server.addr(), &max, "a 255-octet name", |r, w| {
        assert_eq!(id_of(r), 0x55FF, "{w}");
        assert_eq!(rcode_of(r), 0, "{w}: {}", hex(r));
        let m = Message::from_vec(r).unwrap_or_else(|e| panic!("{w}: {e}: {}", hex(r)));
        let answers: Vec<String> = m.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(answers, ["10.0.0.5"], "{w}: {}", hex(r));
        assert_eq!(&r[12..12 + name.len()], &name[..], "{w}: question echoed");
    })
    .await;
    server.assert_still_serving("oversized names").await;
    server.stop().await;
}

/// RFC 1035 4.1.1 (QR: 1 = response): a message with QR set is a response, never
/// answered, or two servers could be made to bounce packets at each other
/// (reflection). Not even when it would otherwise be an error (bad opcode, two
/// questions). Over TCP the connection is closed without a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_qr_set_are_never_answered() {
    let server = Server::start("").await;
    let mut response_like = query(0x6601, "x.apps.example.com", TYPE_A);
    response_like[2] |= 0x80;
    let mut update = query(0x6602, "x.apps.example.com", TYPE_A);
    update[2] = 0x80 | (5 << 3);
    let mut two = header(0x6603, QR | RD, 2, 0, 0, 0);
    two.extend(question_wire(&wire_name("x.apps.example.com"), TYPE_A));
    two.extend(question_wire(&wire_name("www.test"), TYPE_A));
    let mut upstream_name = query(0x6604, "www.test", TYPE_A);
    upstream_name[2] |= 0x80;
    let header_only = header(0x6605, QR, 0, 0, 0, 0);
    let packets = vec![response_like, update, two, upstream_name, header_only];
    udp_expect_silence(server.addr(), &packets, "QR=1").await;
    for p in &packets {
        let reply = tcp_exchange(server.addr(), &frame(p), Duration::from_secs(3)).await;
        assert_eq!(reply, Tcp::Closed, "QR=1 over TCP: {}", hex(p));
    }
    assert_eq!(server.upstream.queries("www.test.", "A"), 0, "a response was forwarded");
    server.assert_still_serving("QR=1 packets").await;
    server.stop().await;
}

/// RFC 1035 4.1.1 (RCODE 4, not implemented: "the name server does not support the
/// requested kind of query"): NOTIFY (opcode 4, RFC 1996), UPDATE (5, RFC 2136),
/// the obsolete IQUERY (1), STATUS (2) and an unassigned opcode (15) get NOTIMP
/// with the same ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_opcodes_are_notimp() {
    let server = Server::start("").await;
    for (opcode, what) in [
        (4u8, "NOTIFY"),
        (5, "UPDATE"),
        (1, "IQUERY"),
        (2, "STATUS"),
        (15, "opcode 15"),
    ] {
        let mut p = query(0x7700 + u16::from(opcode), "x.apps.example.com", TYPE_A);
        p[2] = (opcode << 3) | (p[2] & 0x01);
        both_transports(server.addr(), &p, what, |r, w| assert_error(r, &p, NOTIMP, w)).await;
    }
    server.assert_still_serving("NOTIFY and UPDATE").await;
    server.stop().await;
}

/// RFC 1035 4.1.1 (QDCOUNT) and RFC 9619 (a QUERY with QDCOUNT other than 1 is
/// rejected with FORMERR): two questions, or none, get FORMERR with the same ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn question_counts_other_than_one_are_formerr() {
    let server = Server::start("").await;
    let mut two = header(0x8801, RD, 2, 0, 0, 0);
    two.extend(question_wire(&wire_name("x.apps.example.com"), TYPE_A));
    two.extend(question_wire(&wire_name("www.test"), TYPE_A));
    both_transports(server.addr(), &two, "QDCOUNT=2", |r, w| {
        assert_error(r, &two, FORMERR, w)
    })
    .await;
    let none = header(0x8802, RD, 0, 0, 0, 0);
    both_transports(server.addr(), &none, "QDCOUNT=0", |r, w| {
        assert_error(r, &none, FORMERR, w)
    })
    .await;
    assert_eq!(
        server.upstream.queries("www.test.", "A"),
        0,
        "second question forwarded"
    );
    server.assert_still_serving("QDCOUNT=2").await;
    server.stop().await;
}

/// RFC 6891 6.1.1: "If a query message with more than one OPT RR is received, a
/// FORMERR (RCODE=1) MUST be returned"; the OPT RR belongs in the additional
/// section (6.1.1) and its owner is the root (6.1.2). Each violation: FORMERR,
/// same ID. One well-placed OPT is answered with an OPT (control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_or_repeated_opt_records_are_formerr() {
    let server = Server::start("").await;
    let two = query_with_opts(0x9901, "x.apps.example.com", 0, 2);
    both_transports(server.addr(), &two, "two OPT records", |r, w| {
        assert_error(r, &two, FORMERR, w)
    })
    .await;

    let mut in_answer = header(0x9902, RD, 1, 1, 0, 0);
    in_answer.extend(question_wire(&wire_name("x.apps.example.com"), TYPE_A));
    in_answer.extend(opt_record(1232, 0));
    both_transports(server.addr(), &in_answer, "OPT in the answer section", |r, w| {
        assert_error(r, &in_answer, FORMERR, w)
    })
    .await;

    let mut named = header(0x9903, RD, 1, 0, 0, 1);
    named.extend(question_wire(&wire_name("x.apps.example.com"), TYPE_A));
    let mut opt = wire_name("apps.example.com");
    opt.extend_from_slice(&opt_record(1232, 0)[1..]);
    named.extend(opt);
    both_transports(server.addr(), &named, "OPT owned by a non-root name", |r, w| {
        assert_error(r, &named, FORMERR, w)
    })
    .await;

    let one = query_with_opts(0x9904, "x.apps.example.com", 0, 1);
    both_transports(server.addr(), &one, "one OPT record", |r, w| {
        let m = Message::from_vec(r).unwrap_or_else(|e| panic!("{w}: {e}"));
        assert_eq!(m.metadata.id, 0x9904, "{w}");
        assert_eq!(u16::from(m.metadata.response_code), 0, "{w}: {}", hex(r));
        assert!(m.edns.is_some(), "{w}: OPT in the query, none in the response");
        assert_eq!(m.answers.len(), 1, "{w}");
    })
    .await;
    server.assert_still_serving("OPT misuse").await;
    server.stop().await;
}

/// RFC 6891 6.1.3: "If a responder does not implement the VERSION level of the
/// request, then it MUST respond with RCODE=BADVERS" (16: the upper 8 bits in the
/// OPT's extended RCODE, the lower 4 in the header), and its OPT carries the
/// version it does implement (0). The question is echoed, nothing is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_edns_version_is_badvers() {
    let server = Server::start("").await;
    for version in [1u8, 255] {
        let p = query_with_opts(0xAA00 + u16::from(version), "x.apps.example.com", version, 1);
        let what = format!("EDNS version {version}");
        both_transports(server.addr(), &p, &what, |r, w| {
            assert_eq!(id_of(r), id_of(&p), "{w}");
            assert!(flags_of(r) & QR != 0, "{w}");
            assert_eq!(rcode_of(r), 0, "{w}: BADVERS has 0 in the header's 4 bits: {}", hex(r));
            assert_eq!(count(r, 0), 1, "{w}: question echoed");
            assert_eq!(count(r, 1), 0, "{w}: no answers");
            let question_end = p.len() - opt_record(0, 0).len();
            assert_eq!(&r[12..question_end], &p[12..question_end], "{w}: question echoed");
            // The OPT record follows the question: owner, type, class, TTL (ext
            // RCODE, VERSION, flags).
            let opt = &r[question_end..];
            assert!(opt.len() >= 11, "{w}: no OPT: {}", hex(r));
            assert_eq!(&opt[..3], &[0, 0, 41], "{w}: {}", hex(r));
            assert_eq!(opt[5], 1, "{w}: extended RCODE: {}", hex(r));
            assert_eq!(opt[6], 0, "{w}: our version is 0: {}", hex(r));
            let m = Message::from_vec(r).unwrap_or_else(|e| panic!("{w}: {e}"));
            assert_eq!(u16::from(m.metadata.response_code), 16, "{w}: {:?}", m.metadata);
        })
        .await;
    }
    server.assert_still_serving("EDNS version 1").await;
    server.stop().await;
}

/// RFC 7766 8: every message is preceded by its two-octet length; a length of 0
/// frames no message (not even a header), so nothing is answered and the
/// connection is closed. Other clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_zero_length_message_is_dropped() {
    let server = Server::start("").await;
    let started = Instant::now();
    let reply = tcp_exchange(server.addr(), &[0, 0], Duration::from_secs(5)).await;
    assert_eq!(reply, Tcp::Closed);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed only after {:?}",
        started.elapsed()
    );
    // A zero length followed by a good query: the good one is not answered either
    // (the stream is out of step and closed), and the server serves on.
    let mut bytes = vec![0, 0];
    bytes.extend(frame(&query(0xBB01, "x.apps.example.com", TYPE_A)));
    let reply = tcp_exchange(server.addr(), &bytes, Duration::from_secs(5)).await;
    assert_eq!(reply, Tcp::Closed);
    server.assert_still_serving("a zero TCP length").await;
    server.stop().await;
}

/// RFC 7766 8: a length prefix announcing more than is sent before the client
/// closes is an incomplete message: no reply, the connection ends, the server
/// serves on. Also the largest length (65535) with nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_length_longer_than_the_data_then_close() {
    let server = Server::start("").await;
    let good = query(0xBC01, "x.apps.example.com", TYPE_A);
    for (announced, sent) in [(good.len() + 10, &good[..]), (512, &good[..5]), (65535, &[][..])] {
        let mut stream = connect(server.addr()).await;
        let mut bytes = (announced as u16).to_be_bytes().to_vec();
        bytes.extend_from_slice(sent);
        stream.write_all(&bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        let reply = tcp_read(&mut stream, Duration::from_secs(3)).await;
        assert_eq!(reply, Tcp::Closed, "length {announced}, {} bytes sent", sent.len());
    }
    server.assert_still_serving("short TCP messages").await;
    server.stop().await;
}

/// RFC 7766 6.2.3 (idle timeouts) and 6.1 (servers must be able to handle many
/// connections): clients that send one byte and stall neither block other TCP or
/// UDP clients nor stay connected past the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tcp_clients_do_not_block_others() {
    let server = Server::start("tcp_idle_timeout = \"1s\"\n").await;
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut s = connect(server.addr()).await;
        s.write_all(&[0]).await.unwrap();
        stalled.push(s);
    }
    let started = Instant::now();
    for transport in ["+tcp", "+notcp"] {
        let d = dig(server.addr(), &["x.apps.example.com", "A", transport]).await;
        assert_eq!(d.answers(), ["10.0.0.5"], "{transport} with stalled clients: {}", d.out);
    }
    let reply = tcp_answer(
        server.addr(),
        &query(0xBD01, "www.test", TYPE_A),
        "query beside stalled clients",
    )
    .await;
    assert_eq!(count(&reply, 1), 1, "{}", hex(&reply));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answers waited for stalled clients: {:?}",
        started.elapsed()
    );
    // Every stalled client is disconnected by the idle timeout (1 s).
    for mut s in stalled {
        let reply = tcp_read(&mut s, Duration::from_secs(4)).await;
        assert_eq!(reply, Tcp::Closed, "stalled client still connected");
    }
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    server.assert_still_serving("stalled TCP clients").await;
    server.stop().await;
}

/// RFC 1035 4.1.1 (RCODE 5, refused "for policy reasons"): a client outside
/// `allow` gets REFUSED over UDP with its ID and its question echoed, for local
/// and upstream names alike, with an OPT when it sent one (RFC 6891 6.1.1);
/// over TCP it is reset at accept (it never holds a connection slot, see
/// dns_trust.rs); nothing is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_are_refused() {
    let server = Server::start("allow = [\"10.0.0.0/8\"]\n").await;
    for (i, name) in ["x.apps.example.com", "www.test"].into_iter().enumerate() {
        let p = query(0xCC00 + i as u16, name, TYPE_A);
        let r = udp_answer(server.addr(), &p, name).await;
        assert_error(&r, &p, REFUSED, name);
        assert_eq!(count(&r, 0), 1, "{name}: question count");
        assert_eq!(&r[12..], &p[12..], "{name}: question echoed");
        let e = query_with_opts(0xCC10 + i as u16, name, 0, 1);
        let r = udp_answer(server.addr(), &e, name).await;
        assert_error(&r, &e, REFUSED, name);
        let m = Message::from_vec(&r).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(m.queries.len(), 1, "{name}");
        assert_eq!(m.queries[0].name().to_ascii(), format!("{name}."), "{name}");
        assert!(m.edns.is_some(), "{name}: no OPT in the REFUSED response");
        // Reset at accept: connect itself may already see it.
        let reply = match TcpStream::connect(server.addr()).await {
            Ok(mut stream) => match stream.write_all(&frame(&p)).await {
                Ok(()) => tcp_read(&mut stream, Duration::from_secs(3)).await,
                Err(_) => Tcp::Closed,
            },
            Err(_) => Tcp::Closed,
        };
        assert_eq!(reply, Tcp::Closed, "{name} over TCP from outside allow");
        let d = dig(server.addr(), &[name, "A", "+notcp"]).await;
        assert_eq!(d.status(), "REFUSED", "{}", d.out);
        assert!(d.out.contains(&format!(";{name}.\t")), "question not echoed: {}", d.out);
    }
    assert_eq!(server.upstream.queries("www.test.", "A"), 0, "refused query forwarded");
    server.stop().await;
}

/// A UDP "upstream" that answers every query with `reply(query)`.
async fn fake_upstream(reply: fn(&[u8]) -> Vec<u8>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, src)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&reply(&buf[..n]), src).await;
        }
    });
    addr
}

/// Offset just past the (uncompressed) question of a query.
fn question_end_of(q: &[u8]) -> usize {
    let mut pos = 12;
    while q[pos] != 0 {
        pos += 1 + q[pos] as usize;
    }
    pos + 5
}

/// An A record (owner: a pointer to the question name) for upstream replies.
fn a_record(ip: [u8; 4]) -> Vec<u8> {
    let mut r = vec![0xC0, 0x0C];
    r.extend_from_slice(&TYPE_A.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&300u32.to_be_bytes());
    r.extend_from_slice(&4u16.to_be_bytes());
    r.extend_from_slice(&ip);
    r
}

/// RFC 6891 6.1.1 (the OPT RR belongs in the additional section) and RFC 1035
/// 4.1.1 (16-bit section counts), from the other side: an upstream that answers
/// with an OPT record in the answer section, or with ANCOUNT + NSCOUNT beyond
/// 65535, costs at most that one answer (SERVFAIL, or the records without the
/// OPT), never a dead task, a silent client or a malformed, cached reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_responses_are_contained() {
    let upstream = fake_upstream(|q| {
        let end = question_end_of(q);
        let question = &q[12..end];
        // The name comes in random case (0x20); the reply echoes it as it came.
        let lower = question.to_ascii_lowercase();
        if lower.starts_with(b"\x06optans\x07") {
            // An A record and an OPT, both in the answer section; ARCOUNT 0.
            let mut r = header(id_of(q), QR | RD | 0x80, 1, 2, 0, 0);
            r.extend_from_slice(question);
            r.extend(a_record([192, 0, 2, 98]));
            r.extend(opt_record(1232, 0));
            r
        } else if lower.starts_with(b"\x06counts\x07") {
            // ANCOUNT 1 + NSCOUNT 65535 do not fit 16 bits.
            let mut r = header(id_of(q), QR | RD | 0x80, 1, 1, 65535, 0);
            r.extend_from_slice(question);
            r.extend(a_record([192, 0, 2, 97]));
            r.extend(a_record([192, 0, 2, 96]));
            r
        } else {
            let mut r = header(id_of(q), QR | RD | 0x80, 1, 1, 0, 0);
            r.extend_from_slice(question);
            r.extend(a_record([192, 0, 2, 99]));
            r
        }
    })
    .await;
    let wf = Wayfinder::start(&format!(
        "[dns]\nupstreams = [\"{upstream}\"]\nwildcard_domain = \".apps.example.com\"\n\
         wildcard_targets = [\"10.0.0.5\"]\n"
    ))
    .await;
    for name in ["optans.example", "counts.example"] {
        for edns in ["+edns", "+noedns"] {
            // Twice: the second may come from the cache.
            for _ in 0..2 {
                let d = dig(wf.addr, &[name, "A", edns]).await;
                assert!(
                    ["NOERROR", "SERVFAIL"].contains(&d.status().as_str()),
                    "{name} {edns}: {}",
                    d.out
                );
                assert!(
                    !d.out.contains("malformed") && !d.out.contains("bad packet"),
                    "{name} {edns}: {}",
                    d.out
                );
            }
        }
    }
    let d = dig(wf.addr, &["good.example", "A"]).await;
    assert_eq!(d.answers(), ["192.0.2.99"], "{}", d.out);
    let d = dig(wf.addr, &["x.apps.example.com", "A"]).await;
    assert_eq!(d.answers(), ["10.0.0.5"], "{}", d.out);
    wf.stop().await;
}
