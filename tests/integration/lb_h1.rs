//! The lb's own HTTP/1.1 path (`src/lb/proxy/http1.rs`) at its edges, black
//! box: the real lb, the shared Consul agent, hand-written raw TCP clients
//! (exact bytes in, exact bytes read) and hand-written raw TCP backends (exact
//! bytes out, every byte they get recorded). Strict framing refused and the
//! connection closed before any backend sees a byte; chunked and long request
//! bodies arrive whole; `Expect: 100-continue` answered by the lb; pooled
//! connections the backend closed are replaced; pipelining; HTTP/1.0
//! clients; answers delimited by close, to HEAD, after interim 1xx; and
//! malformed answers give 502.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Consul, Lb, consul_section, register_tagged};

/// Longest wait for one read from the lb (a hang fails the test).
const READ_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the lb to close a connection it should close.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// HTTP/1.1 bits both sides need (written here, not the lb's parser).

/// A message head: its first line and its fields (names lowercased).
#[derive(Debug, Clone)]
struct Head {
    line: String,
    fields: Vec<(String, String)>,
    /// The head's text as it came (blank line included).
    text: String,
}

impl Head {
    /// The value of the one field `name` (lowercase); panics on two.
    fn get(&self, name: &str) -> Option<&str> {
        let mut found = self.fields.iter().filter(|(n, _)| n == name);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "two {name} fields in {:?}", self.text);
        first
    }

    fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _)| n == name)
    }

    /// The request target (second word of a request line).
    fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }

    /// The status (second word of a status line).
    fn status(&self) -> u16 {
        self.line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

/// A complete head at the start of `buf` and its length, `None` until its
/// blank line came. Both sides here are well-behaved: CRLF only.
fn parse_head(buf: &[u8]) -> Option<(usize, Head)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("").to_string();
    let fields = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or((l, ""));
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Some((end, Head { line, fields, text }))
}

/// A complete chunked body at the start of `buf`: (decoded data, bytes it took);
/// `None` while incomplete. Panics on a malformed one.
fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[at..line_end]).expect("chunk size line is text");
        let size = line.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        at = line_end + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((data, at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        data.extend_from_slice(&buf[at..at + size]);
        assert_eq!(
            &buf[at + size..at + size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        at += size + 2;
    }
}

/// `data` in the chunked coding, cut into chunks of `sizes` (the rest in one).
fn chunked(data: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
        let take = size.min(rest.len());
        if take == 0 {
            break;
        }
        out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..take]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[take..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// `n` bytes no shifted copy of itself matches (reordering or loss shows).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// A complete answer with a Content-Length body.
fn ok(body: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

// ---------------------------------------------------------------------------
// A raw backend: every byte recorded, every request answered by a script.

/// One request a raw backend read whole.
#[derive(Debug, Clone)]
struct Seen {
    /// The backend connection it came on (accept order) and its place there.
    conn: usize,
    nth: usize,
    head: Head,
    /// The body, decoded when chunked.
    body: Vec<u8>,
}

/// What a raw backend does for a request, in order.
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Closes the connection (the rest of the steps are skipped).
    Close,
}

type Script = Arc<dyn Fn(&Seen) -> Vec<Step> + Send + Sync>;

/// A plain TCP backend speaking HTTP/1.1 by hand. `GET /ready` is answered
/// `ok` (the routing wait); every other request by the script. Aborted
/// (with its connections) when dropped.
struct RawBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Every byte any connection brought, in arrival order per read.
    bytes: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (seen, bytes) = (seen.clone(), bytes.clone());
            async move {
                // Dropped (aborting every connection) when this task is aborted.
                let mut conns = tokio::task::JoinSet::new();
                for conn in 0.. {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    conns.spawn(serve_raw(stream, conn, script.clone(), seen.clone(), bytes.clone()));
                    while conns.try_join_next().is_some() {}
                }
            }
        });
        RawBackend {
            addr,
            seen,
            bytes,
            task,
        }
    }

    /// The requests read so far, `/ready` ones left out.
    fn requests(&self) -> Vec<Seen> {
        let seen = self.seen.lock();
        seen.iter().filter(|s| s.head.target() != "/ready").cloned().collect()
    }

    /// The requests for `target`.
    fn requests_for(&self, target: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.head.target() == target)
            .collect()
    }

    fn byte_count(&self) -> usize {
        self.bytes.lock().len()
    }

    fn bytes_contain(&self, needle: &[u8]) -> bool {
        self.bytes.lock().windows(needle.len()).any(|w| w == needle)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One read of a backend connection into `buf`, recorded in `bytes`: how
/// many bytes came (0: closed or failed).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, bytes: &Mutex<Vec<u8>>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    bytes.lock().extend_from_slice(&chunk[..n]);
    n
}

/// One backend connection: read requests whole, record, run the script.
async fn serve_raw(
    mut stream: TcpStream,
    conn: usize,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = Vec::new();
    for nth in 0.. {
        let (len, head) = loop {
            if let Some(parsed) = parse_head(&buf) {
                break parsed;
            }
            if read_more(&mut stream, &mut buf, &bytes).await == 0 {
                return;
            }
        };
        buf.drain(..len);
        let body = if head
            .get("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            loop {
                if let Some((data, used)) = decode_chunked(&buf) {
                    buf.drain(..used);
                    break data;
                }
                if read_more(&mut stream, &mut buf, &bytes).await == 0 {
                    return;
                }
            }
        } else {
            let length: usize = head
                .get("content-length")
                .map_or(0, |l| l.parse().expect("a numeric length"));
            while buf.len() < length {
                if read_more(&mut stream, &mut buf, &bytes).await == 0 {
                    return;
                }
            }
            buf.drain(..length).collect()
        };
        let request = Seen { conn, nth, head, body };
        seen.lock().push(request.clone());
        let steps = if request.head.target() == "/ready" {
            vec![Step::Write(ok("ok"))]
        } else {
            script(&request)
        };
        for step in steps {
            match step {
                Step::Write(out) => {
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A raw client.

/// One answer as a client read it.
#[derive(Debug)]
struct Answer {
    head: Head,
    /// The body, decoded when chunked.
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head.status()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection to the lb and the bytes read ahead on it.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(READ_LIMIT, TcpStream::connect(addr))
            .await
            .expect("connect within the limit")
            .expect("the lb accepts");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(READ_LIMIT, self.stream.write_all(bytes))
            .await
            .expect("write within the limit")
            .expect("the lb takes the bytes");
    }

    /// One read into the buffer within `limit`: bytes read, 0 at the end (a
    /// reset counts as the end: the connection is gone either way).
    async fn fill(&mut self, limit: Duration) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "nothing from the lb in {limit:?} (read so far: {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Ok(Err(_)) => 0,
        }
    }

    /// The next head, whole; panics if the connection ends first.
    async fn head(&mut self) -> Head {
        loop {
            if let Some((len, head)) = parse_head(&self.buf) {
                self.buf.drain(..len);
                return head;
            }
            if self.fill(READ_LIMIT).await == 0 {
                panic!(
                    "the connection ended inside a head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// The next answer, read by its framing (`to_head`: an answer to HEAD,
    /// no body whatever its fields say).
    async fn answer(&mut self, to_head: bool) -> Answer {
        let head = self.head().await;
        let status = head.status();
        let body = if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(te) = head.get("transfer-encoding") {
            assert!(te.eq_ignore_ascii_case("chunked"), "an answer coded {te:?}");
            loop {
                if let Some((data, used)) = decode_chunked(&self.buf) {
                    self.buf.drain(..used);
                    break data;
                }
                assert!(
                    self.fill(READ_LIMIT).await > 0,
                    "the connection ended inside a chunked body"
                );
            }
        } else if let Some(length) = head.get("content-length") {
            let length: usize = length.parse().expect("a numeric length");
            while self.buf.len() < length {
                assert!(
                    self.fill(READ_LIMIT).await > 0,
                    "the connection ended inside a body of {length}"
                );
            }
            self.buf.drain(..length).collect()
        } else {
            // Delimited by the close.
            while self.fill(READ_LIMIT).await > 0 {}
            std::mem::take(&mut self.buf)
        };
        Answer { head, body }
    }

    /// Reads until the lb closes the connection (within [`CLOSE_LIMIT`]):
    /// whatever came after the last answer read.
    async fn until_closed(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + CLOSE_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the lb did not close the connection in {CLOSE_LIMIT:?}"
            );
            if self.fill(left).await == 0 {
                return std::mem::take(&mut self.buf);
            }
        }
    }

    /// Whether the connection is still open after `wait` (nothing came).
    async fn still_open(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 1];
        tokio::time::timeout(wait, self.stream.read(&mut chunk)).await.is_err()
    }
}

/// A raw backend running `script`, registered as a fresh `<prefix>` service,
/// and an lb (with `lb_extra` in `[lb]`) routing `<svc>.service` to it.
async fn raw_service(
    prefix: &str,
    lb_extra: &str,
    script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static,
) -> (String, RawBackend, Lb) {
    let consul = Consul::shared();
    let backend = RawBackend::start(script).await;
    let svc = register_tagged(consul, prefix, backend.addr.port());
    let lb = Lb::start(&format!("{}[lb]\n{lb_extra}", consul_section(consul))).await;
    let host = format!("{svc}.service");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = Client::connect(lb.addr).await;
        c.send(format!("GET /ready HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        let a = c.answer(false).await;
        if a.status() == 200 && a.body == b"ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never routed: {} {}",
            a.status(),
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (host, backend, lb)
}

// ---------------------------------------------------------------------------
// The tests.

/// Every head and body framing a smuggling attack needs is refused with the
/// status `h1::Refusal::status` names (400; 501 for a coding other than one
/// final chunked; a bad chunk size in the body is a body that cannot be read:
/// 400), the connection is closed after that one answer (a request pipelined
/// behind it is never answered), and the backend never gets a byte of either:
/// a chunked body is read whole (it is below `body_buffer_bytes`) before an
/// instance is chosen, so a bad chunk size stops it before the backend too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_framing_is_refused_and_closed_before_any_backend() {
    let (host, backend, lb) = raw_service("h1strict", "", |_| vec![Step::Write(ok("served"))]).await;
    let h = &host;
    let cases: Vec<(&str, u16, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            400,
            format!(
                "POST /smuggle HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "two differing Content-Lengths",
            400,
            format!("POST /smuggle HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ),
        (
            "Content-Length: 1, 1",
            400,
            format!("POST /smuggle HTTP/1.1\r\nHost: {h}\r\nContent-Length: 1, 1\r\n\r\nx"),
        ),
        (
            "Content-Length: abc",
            400,
            format!("POST /smuggle HTTP/1.1\r\nHost: {h}\r\nContent-Length: abc\r\n\r\n"),
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            501,
            format!("POST /smuggle HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            501,
            format!("POST /smuggle HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ),
        (
            "obs-fold",
            400,
            format!("GET /smuggle HTTP/1.1\r\nHost: {h}\r\nX-Long: a\r\n  folded\r\n\r\n"),
        ),
        (
            "a bare LF ending a field line",
            400,
            format!("GET /smuggle HTTP/1.1\r\nHost: {h}\nX-After: b\r\n\r\n"),
        ),
        (
            "a bare LF ending the request line",
            400,
            format!("GET /smuggle HTTP/1.1\nHost: {h}\r\n\r\n"),
        ),
        (
            "whitespace before a colon",
            400,
            format!("GET /smuggle HTTP/1.1\r\nHost : {h}\r\n\r\n"),
        ),
        (
            "two Host lines",
            400,
            format!("GET /smuggle HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\n\r\n"),
        ),
        (
            "HTTP/1.1 without Host",
            400,
            "GET /smuggle HTTP/1.1\r\n\r\n".to_string(),
        ),
        (
            "a bad chunk size",
            400,
            format!(
                "POST /smuggle HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
            ),
        ),
    ];
    let before = backend.byte_count();
    let pipelined = format!("GET /smuggle-behind HTTP/1.1\r\nHost: {h}\r\n\r\n");
    for (what, want, request) in &cases {
        let mut c = Client::connect(lb.addr).await;
        c.send(format!("{request}{pipelined}").as_bytes()).await;
        let answer = c.answer(false).await;
        assert_eq!(answer.status(), *want, "{what}: {:?}", answer.head.text);
        let rest = c.until_closed().await;
        assert!(
            rest.is_empty(),
            "{what}: nothing after the refusal (the pipelined request unanswered), got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    // A good request on a new connection still goes through: the backend was
    // reachable all along, and is the only thing it got.
    let mut c = Client::connect(lb.addr).await;
    c.send(format!("GET /good HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "served"));
    let targets: Vec<String> = backend.requests().iter().map(|s| s.head.target().to_string()).collect();
    assert_eq!(targets, ["/good"], "the backend got only the good request");
    assert!(
        !backend.bytes_contain(b"smuggle"),
        "no byte of a refused request reached the backend"
    );
    let good = backend.requests_for("/good")[0].head.text.len();
    assert_eq!(
        backend.byte_count() - before,
        good,
        "the backend got the good head and nothing else"
    );
}

/// Chunked request bodies, and one announced by Content-Length, against
/// `body_buffer_bytes = 1024`: a chunked body below it (with an extension and
/// a trailer) reaches the backend with a Content-Length and its exact bytes;
/// a chunked one above it, sent in pieces cut mid-line, is re-chunked and
/// decodes to exactly what was sent; a 5000-byte Content-Length body sent in
/// pieces arrives whole with its length. All on one keep-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_chunked_or_long_arrive_whole() {
    let (host, backend, lb) = raw_service("h1bodies", "body_buffer_bytes = 1024\n", |seen| {
        vec![Step::Write(ok(&format!("got {}", seen.body.len())))]
    })
    .await;
    let mut c = Client::connect(lb.addr).await;

    // Below the buffer: one write, an extension and a trailer.
    let small = pattern(300);
    let mut request =
        format!("POST /small HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    request.extend_from_slice(b"64;name=value\r\n");
    request.extend_from_slice(&small[..100]);
    request.extend_from_slice(b"\r\nc8\r\n");
    request.extend_from_slice(&small[100..]);
    request.extend_from_slice(b"\r\n0\r\nX-Trailer: t\r\n\r\n");
    c.send(&request).await;
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "got 300"));
    let seen = &backend.requests_for("/small")[0];
    assert_eq!(seen.head.get("content-length"), Some("300"), "{}", seen.head.text);
    assert!(!seen.head.has("transfer-encoding"), "{}", seen.head.text);
    assert_eq!(seen.body, small, "the exact bytes");

    // Above the buffer: in pieces, each write cut where it falls.
    let large = pattern(5000);
    let coded = chunked(&large, &[700, 1300, 1, 999]);
    c.send(format!("POST /large HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes())
        .await;
    for piece in coded.chunks(613) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "got 5000"));
    let seen = &backend.requests_for("/large")[0];
    assert_eq!(
        seen.head.get("transfer-encoding"),
        Some("chunked"),
        "{}",
        seen.head.text
    );
    assert!(!seen.head.has("content-length"), "{}", seen.head.text);
    assert_eq!(seen.body, large, "decoded, the exact bytes sent");

    // Content-Length above the buffer, in pieces.
    c.send(format!("POST /long HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000\r\n\r\n").as_bytes())
        .await;
    for piece in large.chunks(1200) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "got 5000"));
    let seen = &backend.requests_for("/long")[0];
    assert_eq!(seen.head.get("content-length"), Some("5000"), "{}", seen.head.text);
    assert!(!seen.head.has("transfer-encoding"), "{}", seen.head.text);
    assert_eq!(seen.body, large);
    assert_eq!(lb.state.bodies.used(), 0, "the buffered bodies are given back");
}

/// `Expect: 100-continue` with the body held back: the lb answers
/// `100 Continue` itself, the body then sent reaches the backend whole, the
/// client gets the backend's 200, and the backend never sees the Expect
/// field (nor is asked to send a 100 of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_lb() {
    let (host, backend, lb) = raw_service("h1expect", "", |seen| {
        vec![Step::Write(ok(&format!("got {}", String::from_utf8_lossy(&seen.body))))]
    })
    .await;
    let mut c = Client::connect(lb.addr).await;
    c.send(
        format!("POST /expect HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let interim = c.head().await;
    assert_eq!(interim.text, "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(c.buf.is_empty(), "nothing after the 100 before the body");
    assert!(backend.requests_for("/expect").is_empty(), "no request before the body");
    c.send(b"hello world").await;
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "got hello world"));
    let seen = &backend.requests_for("/expect")[0];
    assert!(!seen.head.has("expect"), "the backend got Expect: {}", seen.head.text);
    assert_eq!(seen.head.get("content-length"), Some("11"));
    // The connection goes on.
    c.send(format!("GET /after HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.answer(false).await.text(), "got ");
}

/// A backend that closes its keep-alive connections: after a short delay
/// while they sit idle in the lb's pool (the pool sees the close and makes a
/// new connection), and on the next request it gets on them, without
/// answering it (the race an idle timeout makes: the lb sends it again on a
/// new connection, the body still at hand). Either way, a GET and a POST with
/// a small body sent after the close get 200, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_backend_closed_are_replaced() {
    let (host, backend, lb) = raw_service("h1pool", "", |seen| {
        let answer = ok(&format!(
            "{} {}",
            seen.head.target(),
            String::from_utf8_lossy(&seen.body)
        ));
        if seen.head.target().starts_with("/idle") {
            vec![
                Step::Write(answer),
                Step::Sleep(Duration::from_millis(150)),
                Step::Close,
            ]
        } else if seen.head.target().starts_with("/race") && seen.nth > 0 {
            // A request on a connection already used: closed unanswered.
            vec![Step::Close]
        } else {
            vec![Step::Write(answer)]
        }
    })
    .await;
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let post = |target: &str| format!("POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n\r\ndata");
    let mut c = Client::connect(lb.addr).await;
    for (target, request, pause) in [
        // Each answered, then its connection closed 150 ms later, idle.
        ("/idle-get", get("/idle-get"), 400),
        ("/idle-post", post("/idle-post"), 400),
        // An open connection in the pool, which the backend then closes on
        // the next request it gets (twice: each retry's connection is pooled).
        ("/prime", get("/prime"), 0),
        ("/race-get", get("/race-get"), 0),
        ("/race-post", post("/race-post"), 0),
    ] {
        c.send(request.as_bytes()).await;
        let answer = c.answer(false).await;
        let body = if target.contains("post") { "data" } else { "" };
        assert_eq!((answer.status(), answer.text()), (200, format!("{target} {body}")));
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for target in ["/idle-get", "/idle-post"] {
        assert_eq!(backend.requests_for(target).len(), 1, "{target}");
    }
    assert_ne!(
        backend.requests_for("/idle-get")[0].conn,
        backend.requests_for("/idle-post")[0].conn,
        "the closed connection was not used again"
    );
    // The race: sent on the pooled connection first (closed unanswered: nth
    // > 0), then again, whole, on a new one (nth 0).
    for target in ["/race-get", "/race-post"] {
        let seen = backend.requests_for(target);
        assert_eq!(seen.len(), 2, "{target}: {seen:?}");
        assert!(seen[0].nth > 0 && seen[1].nth == 0, "{target}: {seen:?}");
        assert_ne!(seen[0].conn, seen[1].conn);
        let body = if target.contains("post") { &b"data"[..] } else { b"" };
        assert!(seen.iter().all(|s| s.body == body), "{target}: the body both times");
    }
}

/// Three GETs in one write on one connection: three answers in their order,
/// though the first is slow and chunked, the others by length; the last asks
/// for the close and gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (host, backend, lb) = raw_service("h1pipe", "", |seen| match seen.head.target() {
        "/p1" => vec![
            Step::Sleep(Duration::from_millis(200)),
            Step::Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n0\r\n\r\n".to_vec()),
        ],
        "/p2" => vec![Step::Write(ok("two"))],
        _ => vec![Step::Write(ok("three"))],
    })
    .await;
    let mut c = Client::connect(lb.addr).await;
    c.send(
        format!(
            "GET /p1 HTTP/1.1\r\nHost: {host}\r\n\r\nGET /p2 HTTP/1.1\r\nHost: {host}\r\n\r\n\
             GET /p3 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let answer = c.answer(false).await;
        assert_eq!(answer.status(), 200, "{:?}", answer.head.text);
        bodies.push(answer.text());
    }
    assert_eq!(bodies, ["one", "two", "three"]);
    assert!(c.until_closed().await.is_empty(), "nothing after the third answer");
    let targets: Vec<String> = backend.requests().iter().map(|s| s.head.target().to_string()).collect();
    assert_eq!(targets, ["/p1", "/p2", "/p3"]);
}

/// HTTP/1.0 clients: a chunked answer reaches one decoded (no
/// Transfer-Encoding, the exact bytes, the end shown by the close); one that
/// asks for keep-alive gets a Content-Length answer with `Connection:
/// keep-alive` and the connection stays open for a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_decoded_or_kept_alive_answers() {
    let (host, _backend, lb) = raw_service("h1ten", "", |seen| match seen.head.target() {
        "/chunked" => vec![
            Step::Write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec()),
            Step::Sleep(Duration::from_millis(50)),
            Step::Write(b"6\r\n world\r\n0\r\n\r\n".to_vec()),
        ],
        target => vec![Step::Write(ok(&format!("at {target}")))],
    })
    .await;

    let mut c = Client::connect(lb.addr).await;
    c.send(format!("GET /chunked HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let head = c.head().await;
    assert_eq!(head.status(), 200);
    assert!(!head.has("transfer-encoding"), "{}", head.text);
    assert!(!head.has("content-length"), "{}", head.text);
    assert_eq!(
        head.get("connection").map(str::to_ascii_lowercase).as_deref(),
        Some("close")
    );
    assert_eq!(c.until_closed().await, b"hello world", "decoded, ended by the close");

    let mut c = Client::connect(lb.addr).await;
    for n in 1..=2 {
        c.send(format!("GET /ka{n} HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await;
        let answer = c.answer(false).await;
        assert_eq!((answer.status(), answer.text()), (200, format!("at /ka{n}")));
        assert_eq!(
            answer.head.get("connection").map(str::to_ascii_lowercase).as_deref(),
            Some("keep-alive"),
            "{}",
            answer.head.text
        );
        assert!(c.still_open(Duration::from_millis(300)).await, "open after answer {n}");
    }
    // Without keep-alive, HTTP/1.0 closes.
    c.send(format!("GET /last HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.answer(false).await.text(), "at /last");
    assert!(c.until_closed().await.is_empty());
}

/// Answer framings: a body delimited by the backend's close is relayed
/// whole (sent in pieces) and the client's connection closes after it; a
/// HEAD answer announcing `Content-Length: 1000` and bringing no body does
/// not hang the next request on the connection (and the length is kept);
/// interim answers (100, 103) before the final one are not passed on: the
/// client sees only the 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_framings_are_relayed_exactly() {
    let long = pattern(40_000);
    let (host, _backend, lb) = raw_service("h1framing", "", move |seen| match seen.head.target() {
        "/until-close" => vec![
            Step::Write(b"HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\n".to_vec()),
            Step::Write(long[..10_000].to_vec()),
            Step::Sleep(Duration::from_millis(50)),
            Step::Write(long[10_000..].to_vec()),
            Step::Sleep(Duration::from_millis(50)),
            Step::Close,
        ],
        "/head" => vec![Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec())],
        "/interim" => vec![
            Step::Write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n".to_vec()),
            Step::Sleep(Duration::from_millis(100)),
            Step::Write(ok("final")),
        ],
        target => vec![Step::Write(ok(&format!("at {target}")))],
    })
    .await;
    let long = pattern(40_000);

    let mut c = Client::connect(lb.addr).await;
    c.send(format!("GET /until-close HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let head = c.head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.get("x-framing"), Some("none"));
    assert_eq!(
        head.get("connection").map(str::to_ascii_lowercase).as_deref(),
        Some("close"),
        "{}",
        head.text
    );
    assert!(!head.has("content-length") && !head.has("transfer-encoding"));
    let body = c.until_closed().await;
    assert_eq!(body.len(), long.len());
    assert!(body == long, "the exact bytes, then the close");

    let mut c = Client::connect(lb.addr).await;
    c.send(format!("HEAD /head HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let answer = c.answer(true).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.head.get("content-length"), Some("1000"), "the length is kept");
    assert!(c.buf.is_empty(), "no body after a HEAD answer");
    c.send(format!("GET /after-head HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let answer = c.answer(false).await;
    assert_eq!((answer.status(), answer.text().as_str()), (200, "at /after-head"));

    let mut c = Client::connect(lb.addr).await;
    c.send(format!("POST /interim HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nhi").as_bytes())
        .await;
    let answer = c.answer(false).await;
    assert_eq!(
        (answer.status(), answer.text().as_str()),
        (200, "final"),
        "the first answer the client sees is the final one: {}",
        answer.head.text
    );
    c.send(format!("GET /after-interim HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await;
    let answer = c.answer(false).await;
    assert_eq!(answer.text(), "at /after-interim");
    assert!(c.until_closed().await.is_empty(), "no stray interim answer anywhere");
}

/// Malformed answers give the client 502 (the client connection closed when
/// the 502 says so, else serving on), and the backend connection is not
/// pooled (the next request is served): a head
/// with both Content-Length and Transfer-Encoding, a non-numeric
/// Content-Length, a head that is no HTTP, a head cut by the close (to a
/// POST: a GET would be tried on another instance, and with none left get
/// 503 as on the hyper path), and a chunked body malformed before any byte
/// of the answer reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_502() {
    let (host, _backend, lb) = raw_service("h1bad", "", |seen| match seen.head.target() {
        "/length-and-encoding" => vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        )],
        "/bad-length" => vec![Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n".to_vec())],
        "/garbage" => vec![Step::Write(b"SSH-2.0-OpenSSH_9.6\r\nnonsense\r\n\r\n".to_vec())],
        "/cut-head" => vec![Step::Write(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec()), Step::Close],
        "/bad-chunk" => vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
        )],
        target => vec![Step::Write(ok(&format!("at {target}")))],
    })
    .await;
    for (method, target) in [
        ("GET", "/length-and-encoding"),
        ("GET", "/bad-length"),
        ("GET", "/garbage"),
        ("POST", "/cut-head"),
        ("GET", "/bad-chunk"),
    ] {
        let mut c = Client::connect(lb.addr).await;
        let body = if method == "POST" {
            "Content-Length: 2\r\n\r\nhi"
        } else {
            "\r\n"
        };
        c.send(format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n{body}").as_bytes())
            .await;
        let answer = c.answer(false).await;
        assert_eq!(answer.status(), 502, "{target}: {} {}", answer.head.text, answer.text());
        // Closed when the 502 says so; else the connection serves on.
        if answer
            .head
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            assert!(c.until_closed().await.is_empty(), "{target}: closed after the 502");
            c = Client::connect(lb.addr).await;
        }
        c.send(format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
        let answer = c.answer(false).await;
        assert_eq!(
            (answer.status(), answer.text().as_str()),
            (200, "at /ok"),
            "after {target}"
        );
    }
}
