//! The lb's bounds on what clients can hold: connections capped per source
//! address and in total, h2 handshakes and idle sessions timed out, a client
//! that stops reading cut after `client_timeout` (its maxconn slot freed), and
//! the maxconn queue woken by freed slots and bounded in length.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{Consul, Lb, consul_section, eventually, register_tagged};

/// Size of the `/big` body: far more than the socket buffers on both sides of
/// the lb hold, so a client that stops reading stalls the lb.
const BIG: u64 = 64 << 20;

/// A backend on 127.0.0.1: `/big` streams [`BIG`] bytes, `/hold` answers once
/// the test releases it, anything else answers `ok`.
struct Backend {
    addr: SocketAddr,
    release: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
}

/// [`BIG`] bytes in 64 KiB chunks.
struct BigBody(u64);

impl hyper::body::Body for BigBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        let n = self.0.min(CHUNK.len() as u64);
        self.0 -= n;
        Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.0 == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0)
    }
}

impl Backend {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (released, token) = (released.clone(), token.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut released = released.clone();
                        async move {
                            let body = match req.uri().path() {
                                "/big" => http_body_util::Either::Left(BigBody(BIG)),
                                "/hold" => {
                                    let _ = released.wait_for(|r| *r).await;
                                    http_body_util::Either::Right(http_body_util::Full::new(Bytes::from("held")))
                                }
                                _ => http_body_util::Either::Right(http_body_util::Full::new(Bytes::from("ok"))),
                            };
                            Ok::<_, std::convert::Infallible>(http::Response::new(body))
                        }
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
        Backend { addr, release, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A service on the shared Consul served by a fresh [`Backend`], and an lb
/// (with `lb_extra` in its `[lb]` section) once it routes the service.
async fn service_and_lb(prefix: &str, lb_extra: &str) -> (String, Backend, Lb) {
    let consul = Consul::shared();
    let backend = Backend::start().await;
    let svc = register_tagged(consul, prefix, backend.addr.port());
    let lb = Lb::start(&format!("{}[lb]\n{lb_extra}", consul_section(consul))).await;
    lb.wait_for(&format!("{svc}.service"), "/", &["ok"]).await;
    (svc, backend, lb)
}

/// Sets `haproxy/<svc>/maxconn` in Consul KV and waits until the lb has it.
async fn set_maxconn(lb: &Lb, svc: &str, n: usize) {
    let consul = Consul::shared();
    crate::harness::http_put(
        consul.http_addr(),
        &format!("/v1/kv/haproxy/{svc}/maxconn"),
        &n.to_string(),
    )
    .unwrap();
    let state = lb.state.clone();
    let svc = svc.to_string();
    eventually(Duration::from_secs(10), "maxconn from KV applied", move || {
        state.maxconn.load().get(&svc) == Some(&n)
    })
    .await;
}

/// A TCP connection to `to` from the source address `from`.
pub async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// True when a connection from `from` to `to` is turned away with a reset
/// within `limit` (before the connect returns, or at the first read): a
/// refused connection must leave no orphaned socket in the lb's kernel, which
/// a plain close (EOF here) would.
async fn refused_within(from: [u8; 4], to: SocketAddr, limit: Duration) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let mut s = match socket.connect(to).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
        Err(e) => panic!("connect from {from:?} to {to}: {e}"),
        Ok(s) => s,
    };
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(Ok(n)) => panic!("a refused connection from {from:?} read {n} bytes instead of a reset"),
        Err(_) => false,
    }
}

/// True when the peer closes `s` within `limit` (EOF or a reset), reading and
/// discarding whatever comes first.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A raw HTTP/1.1 GET over `s`; the status line's code.
async fn raw_get(s: &mut TcpStream, host: &str, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(s).await;
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Reads a response head, byte by byte (nothing of the body).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Over `max_connections_per_source` a source's new connection is closed at
/// once while other sources are served; over `max_connections` everyone's is;
/// closed connections give their slots back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_source_and_in_total() {
    let (svc, _backend, lb) = service_and_lb(
        "conncap",
        "max_connections = 12\nmax_connections_per_source = 4\nhandshake_timeout = \"120s\"\nidle_timeout = \"120s\"\n",
    )
    .await;
    let host = format!("{svc}.service");
    let open = || lb.state.conns.snapshot().open;
    let wait_open = |n: usize| {
        let state = lb.state.clone();
        eventually(
            Duration::from_secs(10),
            "the lb has accepted the connections",
            move || state.conns.snapshot().open == n,
        )
    };
    // The harness's own client may hold a pooled connection from 127.0.0.1.
    let base = open();

    let mut flood = Vec::new();
    for _ in 0..4 {
        flood.push(connect_from([127, 0, 0, 3], lb.addr).await);
    }
    wait_open(base + 4).await;
    assert!(
        refused_within([127, 0, 0, 3], lb.addr, Duration::from_secs(10)).await,
        "a 5th connection from 127.0.0.3 is reset"
    );
    assert_eq!(lb.state.conns.snapshot().refused_per_source, 1);
    let mut other = connect_from([127, 0, 0, 4], lb.addr).await;
    assert_eq!(raw_get(&mut other, &host, "/").await, 200, "another source is served");

    // Fill up to the total cap from more sources (4 each); then nobody new gets in.
    let mut fill = Vec::new();
    while base + 5 + fill.len() < 12 {
        let source = 5 + (fill.len() / 4) as u8;
        fill.push(connect_from([127, 0, 0, source], lb.addr).await);
    }
    wait_open(12).await;
    assert!(
        refused_within([127, 0, 0, 100], lb.addr, Duration::from_secs(10)).await,
        "over max_connections a new source is reset too"
    );
    assert!(lb.state.conns.snapshot().refused_total >= 1);

    // Closed connections give their slots back, per source and in total.
    drop(flood);
    drop(fill);
    wait_open(base + 1).await;
    let mut again = connect_from([127, 0, 0, 3], lb.addr).await;
    assert_eq!(raw_get(&mut again, &host, "/").await, 200, "127.0.0.3 is served again");
    let s = lb.state.conns.snapshot();
    assert!(s.sources <= 3, "only sources with open connections are tracked: {s:?}");
}

/// A rustls client trusting `cert_pem`, offering `alpn`.
pub fn tls_connector(cert_pem: &std::path::Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// After TLS picks h2, a client that sends no preface is closed after
/// `handshake_timeout`; an h2 session without a stream after `idle_timeout`
/// (with a GOAWAY); a TCP client that never starts TLS, and an HTTP/1.1
/// keep-alive connection left idle, are closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_handshakes_and_idle_sessions_time_out() {
    const NAME: &str = "bounds.example.test";
    let consul = Consul::shared();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("site.pem");
    crate::lb_tls::write_cert(&pem, &[NAME]);
    let backend = Backend::start().await;
    let svc = register_tagged(consul, "h2idle", backend.addr.port());
    let lb = Lb::start(&format!(
        "{}[lb]\nssl = true\ncerts = [\"{}\"]\nhandshake_timeout = \"1s\"\nidle_timeout = \"1s\"\n",
        consul_section(consul),
        pem.display()
    ))
    .await;
    let host = format!("{svc}.service");
    lb.wait_for(&host, "/", &["ok"]).await;
    let https = lb.https.expect("https listener");
    let connector = tls_connector(&pem, &[b"h2"]);
    let server_name = rustls::pki_types::ServerName::try_from(NAME).unwrap();

    // h2 chosen, then silence: closed by handshake_timeout.
    let tcp = TcpStream::connect(https).await.unwrap();
    let mut tls = connector
        .connect(server_name.clone(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 negotiated");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an h2 client without a preface is still connected after 15 s"
    );
    assert!(lb.state.stats.snapshot().cut_handshake >= 1);

    // A TCP client that never sends a ClientHello.
    let mut silent = TcpStream::connect(https).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(15)).await,
        "no TLS: closed"
    );

    // A real h2 session: one request, then idle until the lb says GOAWAY.
    let tcp = TcpStream::connect(https).await.unwrap();
    let tls = connector.connect(server_name, tcp).await.expect("TLS handshake");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let session = tokio::spawn(conn);
    let req = http::Request::get(format!("https://{host}/"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    let ended = tokio::time::timeout(Duration::from_secs(15), session).await;
    assert!(ended.is_ok(), "an idle h2 session is still open after 15 s");
    assert!(lb.state.stats.snapshot().cut_idle >= 1);

    // HTTP/1.1 keep-alive: idle after one response, closed by the watchdog (head_ms).
    let mut h1 = TcpStream::connect(lb.addr).await.unwrap();
    assert_eq!(raw_get(&mut h1, &host, "/").await, 200);
    assert!(
        closed_within(&mut h1, Duration::from_secs(15)).await,
        "an idle HTTP/1.1 keep-alive connection stays open"
    );
}

/// A client that reads the head of an 8+ MB response and then stops reading
/// is cut after `client_timeout`, and its maxconn slot serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_and_its_slot_freed() {
    let (svc, _backend, lb) = service_and_lb("stalled", "client_timeout = \"1s\"\nqueue_timeout = \"30s\"\n").await;
    set_maxconn(&lb, &svc, 1).await;
    let host = format!("{svc}.service");

    let mut stalled = TcpStream::connect(lb.addr).await.unwrap();
    stalled
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stalled).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // It reads no more, and its request holds the one slot until client_timeout
    // cuts it: the next request is served from the queue (without the cut it
    // would wait the whole 30 s queue timeout, then get 503).
    let started = Instant::now();
    let (status, body, _) = lb.get(&host, "/").await;
    assert_eq!((status, body.as_str()), (200, "ok"), "after {:?}", started.elapsed());
    assert!(lb.state.stats.snapshot().cut_stalled >= 1);
    // The stalled client finds its connection closed, the body incomplete.
    let mut got = head.len() as u64;
    let mut buf = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n as u64,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled connection is still open");
    assert!(got < BIG, "the body was cut short ({got} bytes)");
}

/// A request queued behind maxconn is served as soon as the slot frees; with
/// the queue full (`max_queued`), one more gets 503 at once, not after
/// `queue_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maxconn_queue_serves_on_release_and_stays_bounded() {
    let (svc, backend, lb) = service_and_lb("queue", "max_queued = 1\nqueue_timeout = \"30s\"\n").await;
    set_maxconn(&lb, &svc, 1).await;
    let host = format!("{svc}.service");
    // Longer than the harness client's 10 s: the held request waits for the test.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .unwrap();
    let get = |path: &'static str| {
        let (client, addr, host) = (client.clone(), lb.addr, host.clone());
        tokio::spawn(async move {
            let (status, body, _) = crate::harness::get_with(&client, addr, &host, path).await;
            (status, body, Instant::now())
        })
    };
    let held = get("/hold");
    let state = lb.state.clone();
    eventually(Duration::from_secs(10), "the held request is in flight", move || {
        let s = wayfinder::lb::status::LbStatus::collect(&state);
        s.routes.iter().flat_map(|r| &r.instances).any(|i| i.inflight == 1)
    })
    .await;
    let queued = get("/");
    let state = lb.state.clone();
    eventually(Duration::from_secs(10), "the second request is queued", move || {
        state.queued.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    // The route shows its part of the queue (stats page, /stats.json, /metrics).
    let status = wayfinder::lb::status::LbStatus::collect(&lb.state);
    let route = status.routes.iter().find(|r| r.service == svc).expect("the route");
    assert_eq!(route.requests.queued, 1, "the route's queue");
    assert!(
        status.render_html().contains("1 queued"),
        "the page shows the route's queue"
    );
    let started = Instant::now();
    let (status, _, _) = lb.get(&host, "/").await;
    assert_eq!(status, 503, "the queue (max_queued = 1) is full");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused at once, not after the 30 s queue timeout: {:?}",
        started.elapsed()
    );
    let released = Instant::now();
    backend.release.send_replace(true);
    let (status, body, done) = queued.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(
        done.duration_since(released) < Duration::from_secs(10),
        "served when the slot freed"
    );
    assert_eq!(held.await.unwrap().0, 200);
    let status = wayfinder::lb::status::LbStatus::collect(&lb.state);
    assert_eq!(
        status.routes.iter().map(|r| r.requests.queued).sum::<usize>(),
        0,
        "the queue is empty again"
    );
}
