//! The framing rules one by one, then generated heads against hyper's own
//! HTTP/1 server parser: whatever this module accepts, hyper accepts with the
//! same method, path, authority and body length (this module may refuse more).

use super::*;

fn request(text: &str) -> Result<Option<RequestHead<'_>>, Refusal> {
    let mut headers = EMPTY_HEADERS;
    // The head borrows `text`; the header array is dropped here, so only the
    // facts (which borrow `text` alone) come back.
    parse_request(text.as_bytes(), &mut headers, 32 * 1024)
}

fn accepted(text: &str) -> RequestHead<'_> {
    match request(text) {
        Ok(Some(head)) => head,
        other => panic!("{text:?}: {other:?}"),
    }
}

fn refused(text: &str) -> Refusal {
    match request(text) {
        Err(r) => r,
        other => panic!("{text:?} was not refused: {other:?}"),
    }
}

#[test]
fn a_plain_request_and_its_facts() {
    let h = accepted("GET /a?b=c HTTP/1.1\r\nHost: Web.Service\r\nX-A: 1\r\n\r\nNEXT");
    assert_eq!((h.method, h.path(), h.version), ("GET", "/a?b=c", Version::Http11));
    assert_eq!(h.authority, b"Web.Service");
    assert_eq!(h.framing, Framing::Empty);
    assert_eq!(
        h.len,
        "GET /a?b=c HTTP/1.1\r\nHost: Web.Service\r\nX-A: 1\r\n\r\n".len()
    );
    assert!(h.keep_alive && !h.upgrade && !h.expect_continue);
    assert_eq!(h.drop, Marks::default());
    assert!(
        request("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none(),
        "incomplete"
    );
}

#[test]
fn framing_and_smuggling_rules() {
    let post = |fields: &str| format!("POST /u HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
    assert_eq!(accepted(&post("Content-Length: 5\r\n")).framing, Framing::Length(5));
    assert_eq!(accepted(&post("Content-Length: 099\r\n")).framing, Framing::Length(99));
    assert_eq!(accepted(&post("Content-Length: 0\r\n")).framing, Framing::Length(0));
    assert_eq!(
        accepted(&post("Content-Length: 5\r\nContent-Length: 5\r\n")).framing,
        Framing::Length(5)
    );
    assert_eq!(
        accepted(&post("Transfer-Encoding: chunked\r\n")).framing,
        Framing::Chunked
    );
    assert_eq!(
        accepted(&post("Transfer-Encoding: Chunked \r\n")).framing,
        Framing::Chunked
    );
    for (fields, want) in [
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            Refusal::LengthAndEncoding,
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
            Refusal::LengthAndEncoding,
        ),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", Refusal::BadLength),
        ("Content-Length: 5, 6\r\n", Refusal::BadLength),
        ("Content-Length: 5, 5\r\n", Refusal::BadLength),
        ("Content-Length: +5\r\n", Refusal::BadLength),
        ("Content-Length: -1\r\n", Refusal::BadLength),
        ("Content-Length: 5 5\r\n", Refusal::BadLength),
        ("Content-Length: 0x10\r\n", Refusal::BadLength),
        ("Content-Length: \r\n", Refusal::BadLength),
        ("Content-Length: 99999999999999999999\r\n", Refusal::BadLength),
        ("Transfer-Encoding: gzip\r\n", Refusal::UnsupportedCoding),
        ("Transfer-Encoding: gzip, chunked\r\n", Refusal::UnsupportedCoding),
        ("Transfer-Encoding: chunked, chunked\r\n", Refusal::UnsupportedCoding),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            Refusal::UnsupportedCoding,
        ),
        ("Transfer-Encoding: \r\n", Refusal::UnsupportedCoding),
    ] {
        assert_eq!(refused(&post(fields)), want, "{fields:?}");
    }
    assert_eq!(
        refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Refusal::EncodingInHttp10
    );
    assert_eq!(Refusal::UnsupportedCoding.status(), 501);
}

#[test]
fn line_and_field_syntax() {
    for (text, want) in [
        ("GET / HTTP/1.1\nHost: a\r\n\r\n", Refusal::BareLf),
        ("GET / HTTP/1.1\r\nHost: a\n\r\n", Refusal::BareLf),
        ("GET / HTTP/1.1\r\nHost: a\r\n\n", Refusal::BareLf),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            Refusal::Malformed("invalid field name (or whitespace before a colon)"),
        ),
        (
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            Refusal::Malformed("invalid field name (or whitespace before a colon)"),
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
            Refusal::Malformed("invalid field value (or obs-fold)"),
        ),
        ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", Refusal::Version),
    ] {
        assert_eq!(refused(text), want, "{text:?}");
    }
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "a".repeat(40_000));
    assert_eq!(refused(&big), Refusal::TooLarge);
    let partial_big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(40_000));
    assert_eq!(refused(&partial_big), Refusal::TooLarge);
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
    assert_eq!(
        refused(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
        Refusal::TooLarge
    );
}

#[test]
fn host_and_target_forms() {
    assert_eq!(refused("GET / HTTP/1.1\r\n\r\n"), Refusal::MissingHost);
    assert_eq!(
        refused("GET / HTTP/1.1\r\nHost: alpha\r\nHost: beta\r\n\r\n"),
        Refusal::DuplicateHost
    );
    assert_eq!(
        refused("GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n"),
        Refusal::DuplicateHost
    );
    assert_eq!(accepted("GET / HTTP/1.0\r\n\r\n").authority, b"");
    for bad in ["a b", "a/b", "user@web", "web:http", "[zz]:80"] {
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n")),
            Refusal::BadHost,
            "{bad}"
        );
    }
    for good in ["web.service.consul", "web:8080", "[::1]:80", "10.0.0.1", ""] {
        accepted(&format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n"));
    }
    // Absolute-form wins over Host (RFC 9112 §3.2.2).
    let h = accepted("GET http://alpha.service:81/x?y HTTP/1.1\r\nHost: beta.service\r\n\r\n");
    assert_eq!((h.authority, h.path()), (&b"alpha.service:81"[..], "/x?y"));
    assert_eq!(accepted("GET HTTPS://alpha HTTP/1.1\r\nHost: b\r\n\r\n").path(), "/");
    assert_eq!(
        refused("GET http://u@alpha/ HTTP/1.1\r\nHost: b\r\n\r\n"),
        Refusal::BadHost
    );
    assert_eq!(refused("GET http:///x HTTP/1.1\r\nHost: b\r\n\r\n"), Refusal::BadHost);
    assert!(matches!(
        refused("GET ftp://a/ HTTP/1.1\r\nHost: b\r\n\r\n"),
        Refusal::Malformed(_)
    ));
    assert!(matches!(
        refused("GET * HTTP/1.1\r\nHost: b\r\n\r\n"),
        Refusal::Malformed(_)
    ));
    assert_eq!(accepted("OPTIONS * HTTP/1.1\r\nHost: b\r\n\r\n").path(), "*");
    assert_eq!(
        refused("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"),
        Refusal::MethodNotAllowed
    );
}

#[test]
fn connection_fields_and_what_is_dropped() {
    let h = accepted(
        "GET / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\
         Keep-Alive: 5\r\nX-Kept: 1\r\nTE: trailers\r\nProxy-Connection: x\r\n\r\n",
    );
    assert_eq!(h.framing, Framing::Empty, "an underscore name frames nothing");
    assert!(!h.keep_alive);
    let dropped: Vec<usize> = (0..h.fields).filter(|&i| h.drop.contains(i)).collect();
    assert_eq!(dropped, [1, 2, 3, 4, 6, 7], "X-Kept (5) and Host (0) stay");
    // `close` is an option, and a field of that name is this hop's too.
    let named = accepted("GET / HTTP/1.1\r\nHost: a\r\nClose: 1\r\nConnection: close\r\n\r\n");
    assert_eq!(
        (0..named.fields)
            .filter(|&i| named.drop.contains(i))
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(!accepted("GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(accepted("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    let ws = accepted("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    assert!(ws.upgrade && ws.keep_alive);
    assert!(!accepted("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade);
    assert!(accepted("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-Continue\r\n\r\n").expect_continue);
}

#[test]
fn responses_and_their_bodies() {
    let parse = |text: &'static str, method: &str| {
        let mut headers = EMPTY_HEADERS;
        parse_response(text.as_bytes(), &mut headers, 32 * 1024, method)
            .map(|r| r.map(|h| (h.status, h.framing, h.keep_alive)))
    };
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\nContent-Length: 07\r\n\r\n", "GET"),
        Ok(Some((200, Framing::Length(7), true)))
    );
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", "HEAD"),
        Ok(Some((200, Framing::Empty, true)))
    );
    assert_eq!(
        parse("HTTP/1.1 204 No Content\r\n\r\n", "GET"),
        Ok(Some((204, Framing::Empty, true)))
    );
    assert_eq!(
        parse("HTTP/1.1 304 x\r\n\r\n", "GET"),
        Ok(Some((304, Framing::Empty, true)))
    );
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\n\r\n", "GET"),
        Ok(Some((200, Framing::UntilClose, false)))
    );
    assert_eq!(
        parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
        Ok(Some((200, Framing::Chunked, true)))
    );
    assert_eq!(
        parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", "GET"),
        Ok(Some((200, Framing::Length(1), false)))
    );
    assert_eq!(
        parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET"
        ),
        Err(Refusal::LengthAndEncoding)
    );
    assert_eq!(parse("HTTP/1.1 200 OK\nA: b\r\n\r\n", "GET"), Err(Refusal::BareLf));
    assert_eq!(parse("HTTP/1.1 200 OK\r\n", "GET"), Ok(None));
}

/// Generated heads against hyper: each case is a request line and a few
/// fields drawn from pools of ordinary and hostile values, joined by CRLF
/// or (sometimes) a bare LF.
mod oracle {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use http_body_util::BodyExt;
    use proptest::prelude::*;

    use super::*;

    /// What hyper made of a request it accepted.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        method: String,
        path: String,
        authority: Vec<u8>,
        body_len: usize,
    }

    const FIELDS: &[&str] = &[
        "Host: web",
        "Host: web.service.consul:8080",
        "Host: [::1]:80",
        "Host: ",
        "Host: a b",
        "Host: user@web",
        "Content-Length: 3",
        "Content-Length: 003",
        "Content-Length: 3, 3",
        "Content-Length: 3, 4",
        "Content-Length: +3",
        "Content-Length: -3",
        "Content-Length:  3 ",
        "Content-Length: 99999999999999999999",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: Chunked",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked, chunked",
        "Transfer_Encoding: chunked",
        "Connection: close",
        "Connection: keep-alive",
        "Connection: upgrade, x-a",
        "Upgrade: websocket",
        "Expect: 100-continue",
        "X-A: 1",
        "X-A: a\tb",
        "X-B : 1",
        "X-C: \u{7f}",
        "X-D: caf\u{e9}",
        " X-E: 1",
    ];
    const METHODS: &[&str] = &["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH"];
    const TARGETS: &[&str] = &[
        "/",
        "/a?b=c",
        "/%7e/x",
        "http://alpha.service/x",
        "HTTP://alpha:81",
        "https://alpha/y?z",
        "*",
        "web:80",
        "ftp://a/",
        "//x",
    ];
    const VERSIONS: &[&str] = &["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0"];

    fn head() -> impl Strategy<Value = String> {
        (
            prop::sample::select(METHODS),
            prop::sample::select(TARGETS),
            prop::sample::select(VERSIONS),
            prop::collection::vec((prop::sample::select(FIELDS), prop::bool::weighted(0.05)), 0..6),
        )
            .prop_map(|(method, target, version, fields)| {
                let mut text = format!("{method} {target} {version}\r\n");
                for (field, bare_lf) in fields {
                    text.push_str(field);
                    text.push_str(if bare_lf { "\n" } else { "\r\n" });
                }
                text.push_str("\r\n");
                text
            })
    }

    /// hyper's verdict on `bytes` (a head, then a body that fits our framing):
    /// what its service saw, or `None` when it refused the request.
    async fn hyper_sees(bytes: Vec<u8>) -> Option<Seen> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
        let record = seen.clone();
        let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let authority = match req.uri().authority() {
                    Some(a) => a.as_str().as_bytes().to_vec(),
                    None => req
                        .headers()
                        .get("host")
                        .map(|h| h.as_bytes().to_vec())
                        .unwrap_or_default(),
                };
                let method = req.method().to_string();
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                if let Ok(body_len) = body {
                    *record.lock() = Some(Seen {
                        method,
                        path,
                        authority,
                        body_len,
                    });
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }
        });
        // Half-close: the client shuts its write side after the request, and
        // hyper must still answer it.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let talk = async move {
            let _ = client.write_all(&bytes).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async { tokio::join!(conn, talk) }).await;
        seen.lock().clone()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn what_we_accept_hyper_accepts_with_the_same_meaning(text in head()) {
            let mut headers = EMPTY_HEADERS;
            let ours = parse_request(text.as_bytes(), &mut headers, 32 * 1024);
            let Ok(Some(h)) = ours else {
                // Refused (or, never here, incomplete): stricter than hyper is allowed.
                return Ok(());
            };
            let mut bytes = text.as_bytes().to_vec();
            let body_len = match h.framing {
                Framing::Length(n) => {
                    bytes.extend(std::iter::repeat_n(b'x', n as usize));
                    n as usize
                }
                Framing::Chunked => {
                    bytes.extend_from_slice(b"2\r\nxy\r\n0\r\n\r\n");
                    2
                }
                Framing::Empty | Framing::UntilClose => 0,
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let seen = runtime.block_on(hyper_sees(bytes));
            let Some(seen) = seen else {
                return Err(TestCaseError::fail(format!("we accept, hyper refuses: {text:?} ({h:?})")));
            };
            prop_assert_eq!(&seen.method, h.method, "{:?}", text);
            prop_assert_eq!(&seen.path, h.path(), "{:?}", text);
            prop_assert_eq!(&seen.authority[..], h.authority, "{:?}", text);
            prop_assert_eq!(seen.body_len, body_len, "{:?}", text);
        }

        /// Any bytes: no panic, and a verdict within the head limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), cut in 0usize..400) {
            let mut headers = EMPTY_HEADERS;
            let _ = parse_request(&bytes, &mut headers, 256);
            let mut headers = EMPTY_HEADERS;
            let _ = parse_response(&bytes, &mut headers, 256, "GET");
            let mut decoder = chunked::Decoder::new();
            let split = cut.min(bytes.len());
            for part in [&bytes[..split], &bytes[split..]] {
                let mut from = 0;
                while from < part.len() {
                    match decoder.step(&part[from..]) {
                        Ok(step) if step.consumed > 0 && !step.done => from += step.consumed,
                        _ => break,
                    }
                }
            }
        }
    }
}
