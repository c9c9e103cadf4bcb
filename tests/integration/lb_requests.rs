//! What one client's requests can make the lb do (issue 21), against the real
//! lb, the shared Consul agent and real HTTP backends, with hand-written
//! HTTP/1.1 and HTTP/2 clients as an attacker would write them:
//! slow request bodies take no maxconn slot (buffered first, held to
//! `min_body_rate` and `request_timeout`), one client source holds at most its
//! `max_client_share` of an instance, buffered bodies stay within
//! `body_buffer_total_bytes`; two Host headers get 400 and the target's
//! authority wins over Host; the forwarding headers are the lb's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::harness::{Consul, HttpBackend, Lb, consul_section, eventually, register_tagged, tagged_backend};
use crate::lb_bounds::{connect_from, tls_connector};

/// The body length the attacker announces (the attack).
const ANNOUNCED: usize = 100_000;
/// Requests the attacker keeps open (more than the default maxconn, 128).
const ATTACKERS: usize = 140;
/// The attacker's source address (the normal client comes from 127.0.0.1).
const ATTACKER: [u8; 4] = [127, 0, 0, 3];

/// An lb (with `lb_extra` in `[lb]`) routing a fresh service served by an
/// [`HttpBackend`] (POSTs answered `<name> got <n>` once read whole).
async fn service_and_lb(prefix: &str, lb_extra: &str) -> (String, HttpBackend, Lb) {
    let consul = Consul::shared();
    let (svc, backend) = tagged_backend(consul, prefix, "ok").await;
    let lb = Lb::start(&format!("{}[lb]\n{lb_extra}", consul_section(consul))).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["ok"]).await;
    (svc, backend, lb)
}

/// Sets `haproxy/<svc>/maxconn` in Consul KV and waits until the lb has it.
async fn set_maxconn(lb: &Lb, svc: &str, n: usize) {
    crate::harness::http_put(
        Consul::shared().http_addr(),
        &format!("/v1/kv/haproxy/{svc}/maxconn"),
        &n.to_string(),
    )
    .unwrap();
    let (state, svc) = (lb.state.clone(), svc.to_string());
    eventually(Duration::from_secs(10), "maxconn from KV applied", move || {
        state.maxconn.load().get(&svc) == Some(&n)
    })
    .await;
}

/// The one instance of `svc` in the lb's table: its in-flight requests, and
/// how many of those the attacker's source holds.
fn instance_load(state: &wayfinder::lb::LbState, svc: &str) -> (usize, usize) {
    let table = state.table.load();
    let Some(instance) = table
        .backends()
        .find(|b| b.service == svc)
        .and_then(|b| b.instances.first())
    else {
        return (0, 0);
    };
    (
        instance.health.inflight.load(Ordering::Relaxed),
        instance.health.holders.held_by(std::net::IpAddr::from(ATTACKER)),
    )
}

/// Samples `svc`'s in-flight requests until `done`: the most seen.
fn watch_inflight(
    state: Arc<wayfinder::lb::LbState>,
    svc: String,
    done: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut most = 0;
        while done.load(Ordering::Relaxed) < ATTACKERS {
            most = most.max(instance_load(&state, &svc).0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    })
}

/// A raw HTTP/1.1 POST from `from`: the head announcing [`ANNOUNCED`] body
/// bytes, `burst` of them at once, then one more every `every` until the lb
/// answers or closes (or `stop`): the status line's code, 0 for none.
async fn trickle_h1(
    from: [u8; 4],
    lb: SocketAddr,
    host: String,
    burst: usize,
    every: Duration,
    stop: CancellationToken,
) -> u16 {
    let mut s = connect_from(from, lb).await;
    let head = format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {ANNOUNCED}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; burst]).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return 0,
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return status_of(&got),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        return status_of(&got);
                    }
                }
            },
            _ = tick.tick() => {
                // The lb may have stopped reading: a failed write is no answer yet.
                let _ = s.write_all(b"x").await;
            }
        }
    }
}

fn status_of(response: &[u8]) -> u16 {
    String::from_utf8_lossy(response)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Requests `/` as a normal client (127.0.0.1) until `done`, each answered 200
/// (a 503 from a pinned instance fails the test): how many were served.
async fn served_throughout(lb: &Lb, host: &str, done: impl Fn() -> bool) -> usize {
    let mut served = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(Instant::now() < deadline, "the attack did not end in 90 s");
        let started = Instant::now();
        let (status, body, _) = lb.get(host, "/").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "ok"),
            "the normal client, request {served}, after {:?}",
            started.elapsed()
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    served
}

/// The attack over HTTP/1.1: 140 POSTs announcing 100000 bytes, one
/// byte per connection every 2 s. The bodies are read before an instance is
/// chosen, so no attacker request takes a slot; each is cut with 408 once a
/// window of waiting brings less than `min_body_rate`; a normal client is
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_take_no_slot_over_http1() {
    let (svc, _backend, lb) = service_and_lb("slowh1", "").await;
    let host = format!("{svc}.service");
    let stop = CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..ATTACKERS {
        let (host, stop, answered) = (host.clone(), stop.clone(), answered.clone());
        let addr = lb.addr;
        attackers.spawn(async move {
            let status = trickle_h1(ATTACKER, addr, host, 1, Duration::from_secs(2), stop).await;
            answered.fetch_add(1, Ordering::Relaxed);
            status
        });
    }
    let state = lb.state.clone();
    eventually(Duration::from_secs(30), "the attackers are connected", move || {
        state.conns.snapshot().open > ATTACKERS
    })
    .await;
    let watch = watch_inflight(lb.state.clone(), svc.clone(), answered.clone());
    let served = served_throughout(&lb, &host, || answered.load(Ordering::Relaxed) == ATTACKERS).await;
    let inflight = watch.await.unwrap();
    stop.cancel();
    let mut statuses = BTreeMap::new();
    while let Some(status) = attackers.join_next().await {
        *statuses.entry(status.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(408, ATTACKERS)]),
        "every attacker is cut with 408"
    );
    assert!(served >= 5, "the normal client was served {served} times");
    assert!(
        inflight <= 1,
        "attackers held {inflight} slots (only the normal client should)"
    );
    let status = wayfinder::lb::status::LbStatus::collect(&lb.state);
    assert!(status.body_too_slow >= ATTACKERS as u64, "counted on the status page");
    assert_eq!(status.body_buffer_bytes, 0, "the buffered bodies are given back");
}

/// A request body that sends what its channel is given.
struct Trickle(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

const CERT_NAME: &str = "requests.example.test";

/// An lb with HTTPS on (a certificate for [`CERT_NAME`] in `dir`) and `lb_extra`.
async fn tls_lb(dir: &std::path::Path, svc_prefix: &str, lb_extra: &str) -> (String, HttpBackend, Lb) {
    let pem = dir.join("site.pem");
    crate::lb_tls::write_cert(&pem, &[CERT_NAME]);
    service_and_lb(
        svc_prefix,
        &format!("ssl = true\ncerts = [\"{}\"]\n{lb_extra}", pem.display()),
    )
    .await
}

/// One HTTP/2 session over TLS to the lb's HTTPS listener, from `from`.
async fn h2_session(dir: &std::path::Path, lb: &Lb, from: [u8; 4]) -> hyper::client::conn::http2::SendRequest<Trickle> {
    let connector = tls_connector(&dir.join("site.pem"), &[b"h2"]);
    let tcp = connect_from(from, lb.https.expect("https listener")).await;
    let name = rustls::pki_types::ServerName::try_from(CERT_NAME).unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// One h2 stream POSTing [`ANNOUNCED`] bytes: `burst` at once, then one every
/// `every`, until the lb answers: its status (0: the stream failed).
async fn trickle_h2(
    mut sender: hyper::client::conn::http2::SendRequest<Trickle>,
    host: String,
    burst: usize,
    every: Duration,
    stop: CancellationToken,
) -> u16 {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = http::Request::post(format!("https://{host}/upload"))
        .header("content-length", ANNOUNCED)
        .body(Trickle(rx))
        .unwrap();
    let feeder = tokio::spawn(async move {
        if tx.send(Bytes::from(vec![b'x'; burst])).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(every).await;
            if tx.send(Bytes::from_static(b"x")).await.is_err() {
                return;
            }
        }
    });
    let status = tokio::select! {
        _ = stop.cancelled() => 0,
        r = async {
            sender.ready().await.ok()?;
            sender.send_request(req).await.ok().map(|r| r.status().as_u16())
        } => r.unwrap_or(0),
    };
    feeder.abort();
    status
}

/// The attack over one h2 connection: 140 streams each announcing
/// 100000 bytes and sending one byte every 2 s. No stream takes a slot, each
/// is cut (408) for its rate, and a normal client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_take_no_slot_over_one_h2_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, _backend, lb) = tls_lb(dir.path(), "slowh2", "").await;
    let host = format!("{svc}.service");
    let session = h2_session(dir.path(), &lb, ATTACKER).await;
    let stop = CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..ATTACKERS {
        let (session, host, stop, answered) = (session.clone(), host.clone(), stop.clone(), answered.clone());
        streams.spawn(async move {
            let status = trickle_h2(session, host, 1, Duration::from_secs(2), stop).await;
            answered.fetch_add(1, Ordering::Relaxed);
            status
        });
    }
    let before = lb.state.stats.snapshot().body_too_slow;
    let watch = watch_inflight(lb.state.clone(), svc.clone(), answered.clone());
    let served = served_throughout(&lb, &host, || answered.load(Ordering::Relaxed) == ATTACKERS).await;
    let inflight = watch.await.unwrap();
    stop.cancel();
    let mut statuses = BTreeMap::new();
    while let Some(status) = streams.join_next().await {
        *statuses.entry(status.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(408, ATTACKERS)]),
        "every stream is cut with 408"
    );
    assert!(served >= 5, "the normal client was served {served} times");
    assert!(
        inflight <= 1,
        "the streams held {inflight} slots (only the normal client should)"
    );
    assert!(lb.state.stats.snapshot().body_too_slow - before >= ATTACKERS as u64);
    assert_eq!(lb.state.bodies.used(), 0);
}

/// `max_client_share`: with bodies longer than `body_buffer_bytes` (each
/// takes its slot once the buffer is full, then trickles), one source over
/// HTTP/1.1 and one h2 connection from another source each hold at most their
/// share (50% of maxconn 10 = 5), the rest get 429 at once, and a third
/// client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holds_at_most_its_share_of_an_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, _backend, lb) = tls_lb(
        dir.path(),
        "share",
        "body_buffer_bytes = 1024\nmin_body_rate = 1\nqueue_timeout = \"30s\"\n",
    )
    .await;
    set_maxconn(&lb, &svc, 10).await;
    let host = format!("{svc}.service");
    let stop = CancellationToken::new();
    let mut h1 = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (host, stop, addr) = (host.clone(), stop.clone(), lb.addr);
        h1.spawn(async move { trickle_h1(ATTACKER, addr, host, 2048, Duration::from_millis(300), stop).await });
    }
    // Five hold slots; three are refused at once (not queued for 30 s).
    let mut refused = 0;
    while refused < 3 {
        let got = tokio::time::timeout(Duration::from_secs(20), h1.join_next())
            .await
            .expect("the requests over the share are answered at once")
            .unwrap()
            .unwrap();
        assert_eq!(got, 429, "over the share");
        refused += 1;
    }
    let l = || instance_load(&lb.state, &svc);
    eventually(Duration::from_secs(10), "the attacker holds its share", || {
        l() == (5, 5)
    })
    .await;
    assert_eq!(lb.state.queued.load(Ordering::Relaxed), 0, "nothing queued");
    let (status, body, _) = lb.get(&host, "/").await;
    assert_eq!((status, body.as_str()), (200, "ok"), "another client is served");

    // One h2 connection from another source: 8 streams, 5 slots at most.
    let other = [127, 0, 0, 5];
    let session = h2_session(dir.path(), &lb, other).await;
    let mut h2 = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (session, host, stop) = (session.clone(), host.clone(), stop.clone());
        h2.spawn(async move { trickle_h2(session, host, 2048, Duration::from_millis(300), stop).await });
    }
    for _ in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(20), h2.join_next())
            .await
            .expect("the streams over the share are answered at once")
            .unwrap()
            .unwrap();
        assert_eq!(got, 429, "h2 streams over the share");
    }
    eventually(Duration::from_secs(10), "both sources hold their share", || {
        l() == (10, 5)
    })
    .await;
    assert!(lb.state.stats.snapshot().over_share >= 6);
    stop.cancel();
    h1.shutdown().await;
    h2.shutdown().await;
    drop(session);
    eventually(Duration::from_secs(30), "the slots are given back", || l() == (0, 0)).await;
}

/// `body_buffer_total_bytes` bounds the memory of all buffered bodies: two
/// requests that stall with nearly `body_buffer_bytes` each fill it; a third
/// finds it spent and goes on with what it has (it takes a slot and streams),
/// and the memory in use never passes the total. All of it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_stay_within_their_total_memory() {
    let (svc, _backend, lb) = service_and_lb(
        "bodymem",
        "body_buffer_bytes = 8192\nbody_buffer_total_bytes = 16384\nmin_body_rate = 1\n",
    )
    .await;
    let host = format!("{svc}.service");
    let stop = CancellationToken::new();
    let most_used = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (state, most_used, stop) = (lb.state.clone(), most_used.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                most_used.fetch_max(state.bodies.used(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut clients = tokio::task::JoinSet::new();
    let mut start = |from: [u8; 4]| {
        let (host, stop, addr) = (host.clone(), stop.clone(), lb.addr);
        // 8000 bytes (under the 8192 buffer: still buffering), then a byte every 300 ms.
        clients.spawn(async move { trickle_h1(from, addr, host, 8000, Duration::from_millis(300), stop).await });
    };
    start([127, 0, 0, 11]);
    start([127, 0, 0, 12]);
    let state = lb.state.clone();
    eventually(Duration::from_secs(20), "two bodies buffered", move || {
        state.bodies.used() >= 16_000
    })
    .await;
    assert_eq!(instance_load(&lb.state, &svc).0, 0, "buffering bodies hold no slot");
    start([127, 0, 0, 13]);
    let state = lb.state.clone();
    eventually(Duration::from_secs(20), "the third streams with a slot", || {
        state.bodies.spent.load(Ordering::Relaxed) >= 1 && instance_load(&lb.state, &svc).0 == 1
    })
    .await;
    assert!(lb.state.bodies.used() <= 16_384);
    stop.cancel();
    sampler.await.unwrap();
    clients.shutdown().await;
    let most = most_used.load(Ordering::Relaxed);
    assert!(most <= 16_384, "{most} bytes buffered at once");
    let state = lb.state.clone();
    eventually(Duration::from_secs(20), "the memory and slots come back", move || {
        state.bodies.used() == 0
    })
    .await;
    eventually(Duration::from_secs(20), "the slot comes back", || {
        instance_load(&lb.state, &svc).0 == 0
    })
    .await;
}

/// `min_body_rate` and `request_timeout`: a body below the rate (100 bytes/s
/// against 500) is cut with 408 after a window of waiting; one above it (4 KB/s)
/// is served; a request that keeps a good rate but outlasts `request_timeout`
/// is cut with 408 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_endless_requests_are_cut() {
    let (svc, _backend, lb) = service_and_lb("bodyrate", "request_timeout = \"8s\"\n").await;
    let host = format!("{svc}.service");

    // 100 bytes every second: below 500 bytes/s.
    let slow = post_paced(lb.addr, &host, 20_000, 100, Duration::from_secs(1)).await;
    assert_eq!(slow.0, 408, "below min_body_rate: {slow:?}");
    assert!(
        slow.1 >= Duration::from_secs(4) && slow.1 < Duration::from_secs(8),
        "cut after one window of waiting: {slow:?}"
    );
    assert!(lb.state.stats.snapshot().body_too_slow >= 1);

    // 2000 bytes every 500 ms: above it; the whole 20 KB reaches the backend.
    let fine = post_paced(lb.addr, &host, 20_000, 2000, Duration::from_millis(500)).await;
    assert_eq!(fine.0, 200, "{fine:?}");
    assert_eq!(fine.2, "ok got 20000");

    // A good rate, but a body of 100000 bytes at 4 KB/s needs 25 s: past the 8 s deadline.
    let endless = post_paced(lb.addr, &host, 100_000, 2000, Duration::from_millis(500)).await;
    assert_eq!(endless.0, 408, "past request_timeout: {endless:?}");
    assert!(
        endless.1 >= Duration::from_secs(7) && endless.1 < Duration::from_secs(20),
        "cut at the deadline: {endless:?}"
    );
    assert!(lb.state.stats.snapshot().request_deadline >= 1);
    assert_eq!(instance_load(&lb.state, &svc).0, 0);
}

/// POSTs a `length`-byte body in `chunk`-byte pieces, one every `every`, until
/// the lb answers: (status, time to the answer, body of the answer).
async fn post_paced(
    lb: SocketAddr,
    host: &str,
    length: usize,
    chunk: usize,
    every: Duration,
) -> (u16, Duration, String) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    let started = Instant::now();
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < length {
            let n = chunk.min(length - sent);
            if w.write_all(&vec![b'y'; n]).await.is_err() {
                return;
            }
            sent += n;
            tokio::time::sleep(every).await;
        }
        // Keep the write side open: the answer is read to its end.
        std::future::pending::<()>().await;
    });
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    response.extend_from_slice(&buf[..n]);
                    if complete(&response) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    writer.abort();
    assert!(read.is_ok(), "no answer in 60 s");
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status_of(&response), took, body)
}

/// True once `response` holds a head and the whole body its Content-Length says.
fn complete(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok());
    length.is_some_and(|n| body.len() >= n)
}

/// A backend that answers every request with what it received: `name`, then
/// one `header: value` line per header line as received, then `body: <n>`.
async fn echo_backend(name: &'static str) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = token.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let token = token.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                    let mut text = format!("{name}\n");
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
                    }
                    let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                    text.push_str(&format!("body: {n}\n"));
                    Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(text))))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = token.cancelled() => {}
                }
            });
        }
    });
    (addr, stop)
}

/// A raw HTTP/1.1 request (`Connection: close` added) and its whole answer:
/// (status, body).
async fn raw(lb: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut response))
        .await
        .expect("an answer within 10 s");
    let text = String::from_utf8_lossy(&response).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status_of(&response), body)
}

/// Two echo services, `alpha` and `beta`, and an lb routing both (with HTTPS).
struct TwoServices {
    alpha: String,
    beta: String,
    lb: Lb,
    dir: tempfile::TempDir,
    _stops: [CancellationToken; 2],
}

async fn two_services() -> TwoServices {
    let consul = Consul::shared();
    let (alpha_addr, a) = echo_backend("alpha").await;
    let (beta_addr, b) = echo_backend("beta").await;
    let alpha = register_tagged(consul, "hosta", alpha_addr.port());
    let beta = register_tagged(consul, "hostb", beta_addr.port());
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("site.pem");
    crate::lb_tls::write_cert(&pem, &[CERT_NAME]);
    let lb = Lb::start(&format!(
        "{}[lb]\nssl = true\ncerts = [\"{}\"]\n",
        consul_section(consul),
        pem.display()
    ))
    .await;
    for svc in [&alpha, &beta] {
        let host = format!("{svc}.service");
        eventually_routed(&lb, &host).await;
    }
    TwoServices {
        alpha,
        beta,
        lb,
        dir,
        _stops: [a, b],
    }
}

async fn eventually_routed(lb: &Lb, host: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while lb.get(host, "/").await.0 != 200 {
        assert!(Instant::now() < deadline, "{host} never routed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An h2 request over a fresh session with the given `:authority` (in the
/// URI) and `host` fields: (status, body).
async fn h2_get(t: &TwoServices, authority: &str, hosts: &[&str]) -> (u16, String) {
    h2_get_with(t, authority, hosts, &[]).await
}

/// [`h2_get`] with more request header fields (name, value), in order.
async fn h2_get_with(t: &TwoServices, authority: &str, hosts: &[&str], fields: &[(&str, &str)]) -> (u16, String) {
    let connector = tls_connector(&t.dir.path().join("site.pem"), &[b"h2"]);
    let tcp = TcpStream::connect(t.lb.https.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(CERT_NAME).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("https://{authority}/h2"))
        .body(http_body_util::Empty::new())
        .unwrap();
    for h in hosts {
        req.headers_mut()
            .append(http::header::HOST, http::HeaderValue::from_str(h).unwrap());
    }
    for (name, value) in fields {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    let resp = sender.send_request(req).await.expect("h2 answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// RFC 9112 3.2: two Host lines get 400 (over h2: two `host` fields), and the
/// backend sees nothing. RFC 9112 3.2.2: an absolute-form target wins over
/// Host; RFC 9113 8.3.1: `:authority` wins over `host`; either way the backend
/// is sent the winner as its Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_are_refused_and_the_target_authority_wins() {
    let t = two_services().await;
    let (alpha, beta) = (format!("{}.service", t.alpha), format!("{}.service", t.beta));
    let addr = t.lb.addr;

    let (status, body) = raw(
        addr,
        &format!("GET /dup HTTP/1.1\r\nHost: {alpha}\r\nHost: {beta}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("alpha") && !body.contains("beta"), "{body}");

    let (status, body) = raw(
        addr,
        &format!("GET http://{beta}/abs HTTP/1.1\r\nHost: {alpha}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("beta\n"), "absolute-form target routes: {body}");
    assert!(body.contains(&format!("\nhost: {beta}\n")), "{body}");
    assert_eq!(body.matches("\nhost: ").count(), 1, "{body}");

    let (status, body) = h2_get(&t, &alpha, &[&alpha, &beta]).await;
    assert_eq!(status, 400, "two h2 host fields: {body}");

    let (status, body) = h2_get(&t, &beta, &[&alpha]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("beta\n"), ":authority routes: {body}");
    assert!(body.contains(&format!("\nhost: {beta}\n")), "{body}");
    assert_eq!(body.matches("\nhost: ").count(), 1, "{body}");
}

/// The forwarding headers are the lb's: `X-Real-IP`, `X-Forwarded-Host`,
/// `X-Forwarded-Proto` and `X-Unique-ID` set (the client's copies gone),
/// `X-Forwarded-For` and `Forwarded` appended to (every client line kept in
/// order, then the real address); `Content-Length: 099` forwarded as `99`;
/// `Transfer_Encoding` and other underscore names dropped.
/// The values of the `name: value` lines of an echo backend's report, in order.
fn header_values(seen: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}: ");
    seen.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lb_forwards_one_truth_about_each_request() {
    let t = two_services().await;
    let alpha = format!("{}.service", t.alpha);
    let body = "x".repeat(99);
    let (status, seen) = raw(
        t.lb.addr,
        &format!(
            "POST /hdr HTTP/1.1\r\nHost: {alpha}\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\
             X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\nX-Unique-ID: mine\r\n\
             X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nContent-Length: 099\r\n\
             Transfer_Encoding: chunked\r\nX_User: admin\r\nConnection: close\r\n\r\n{body}"
        ),
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    let values = |name: &str| header_values(&seen, name);
    assert_eq!(values("x-real-ip"), ["127.0.0.1"], "{seen}");
    assert_eq!(values("x-forwarded-host"), [alpha.as_str()], "{seen}");
    assert_eq!(values("x-forwarded-proto"), ["http"], "{seen}");
    assert_eq!(values("x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 127.0.0.1"], "{seen}");
    assert_eq!(values("forwarded"), ["for=6.6.6.6, for=127.0.0.1;proto=http"], "{seen}");
    let id = values("x-unique-id");
    assert!(id.len() == 1 && id[0] != "mine" && id[0].len() == 20, "{seen}");
    assert_eq!(values("content-length"), ["99"], "{seen}");
    assert_eq!(values("body"), ["99"], "{seen}");
    assert!(!seen.contains('_'), "underscore names dropped: {seen}");

    // Over h2 too (its requests go over the same backend connections, their
    // head written from hyper's request): the client's copies never reach
    // the backend, its forwarding lines are appended to.
    let (status, seen) = h2_get_with(
        &t,
        &alpha,
        &[],
        &[
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "http"),
            ("x-unique-id", "mine"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("forwarded", "for=6.6.6.6"),
            ("x_user", "admin"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    let values = |name: &str| header_values(&seen, name);
    assert_eq!(values("x-real-ip"), ["127.0.0.1"], "{seen}");
    assert_eq!(values("x-forwarded-host"), [alpha.as_str()], "{seen}");
    assert_eq!(values("x-forwarded-proto"), ["https"], "{seen}");
    assert_eq!(values("x-forwarded-for"), ["1.1.1.1, 2.2.2.2, 127.0.0.1"], "{seen}");
    assert_eq!(
        values("forwarded"),
        ["for=6.6.6.6, for=127.0.0.1;proto=https"],
        "{seen}"
    );
    let id = values("x-unique-id");
    assert!(id.len() == 1 && id[0] != "mine", "{seen}");
    assert!(!seen.contains('_'), "underscore names dropped: {seen}");
}
