//! The lb's own HTTP/1.1 framing: request and response heads parsed with
//! `httparse` and held to RFC 9112, the body framing each implies, and the
//! chunked coding. No I/O and no allocation: the proxy hands in its read
//! buffer and a header array, and gets back borrowed facts.
//!
//! ```text
//!  client bytes ─▶ parse_request ─▶ RequestHead { method, target, authority,
//!                   │                  framing, keep_alive, hop-by-hop marks }
//!                   └─▶ Refusal (status + why; the connection is then closed)
//!  backend bytes ─▶ parse_response ─▶ ResponseHead { status, framing, ... }
//!  chunked body ─▶ chunked::Decoder (data ranges, strict sizes and CRLFs)
//! ```
//!
//! Strictness (RFC 9112 and what request smuggling needs): a message with both
//! Content-Length and Transfer-Encoding, differing, listed or malformed
//! Content-Lengths, a coding other than a final `chunked`, obs-fold, a bare
//! LF, whitespace before a colon, two `Host` fields (or none in HTTP/1.1) are
//! refused, and the connection ends. An absolute-form target's authority wins
//! over `Host` (RFC 9112 §3.2.2). Header names with an underscore are marked
//! to be dropped, as nginx drops them, so `Transfer_Encoding` never reaches a
//! backend that folds `_` into `-`.
//!
//! This is the parser of the lb's own HTTP/1.1 path (issue 23); hyper keeps
//! h2, upgrades and anything rare. Its tests hold it to hyper's parser as an
//! oracle: whatever this accepts, hyper accepts with the same meaning.

pub mod chunked;

use httparse::{Header, Status};

/// Header fields a head may carry.
pub const MAX_HEADERS: usize = 100;

/// An empty header array for [`parse_request`] and [`parse_response`].
pub const EMPTY_HEADERS: [Header<'static>; MAX_HEADERS] = [httparse::EMPTY_HEADER; MAX_HEADERS];

/// Digits a Content-Length may have (u64 without overflow).
const MAX_LENGTH_DIGITS: usize = 19;

/// HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a message is refused: the status to answer (requests) and what was
/// wrong, for the log. The connection is closed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not HTTP/1.x syntax (httparse's verdict, or ours on the request line).
    #[error("malformed message head: {0}")]
    Malformed(&'static str),
    /// A line ended by LF alone.
    #[error("a line ends with a bare LF")]
    BareLf,
    /// The head is larger than allowed, or has too many fields.
    #[error("the head is too large")]
    TooLarge,
    /// Content-Length and Transfer-Encoding together.
    #[error("Content-Length and Transfer-Encoding together")]
    LengthAndEncoding,
    /// Content-Length values that differ, or one that is no number.
    #[error("a malformed or conflicting Content-Length")]
    BadLength,
    /// A transfer coding other than one final `chunked`.
    #[error("a transfer coding other than chunked")]
    UnsupportedCoding,
    /// Transfer-Encoding in an HTTP/1.0 message.
    #[error("Transfer-Encoding in an HTTP/1.0 message")]
    EncodingInHttp10,
    /// No Host field in an HTTP/1.1 request.
    #[error("no Host field")]
    MissingHost,
    /// Two or more Host fields.
    #[error("more than one Host field")]
    DuplicateHost,
    /// A Host or absolute-form authority that is no host name or address.
    #[error("a malformed Host")]
    BadHost,
    /// A method the lb does not proxy (CONNECT).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A version other than HTTP/1.0 and HTTP/1.1.
    #[error("HTTP version not supported")]
    Version,
}

impl Refusal {
    /// The status a client gets for it.
    pub fn status(self) -> u16 {
        match self {
            Refusal::TooLarge => 431,
            Refusal::UnsupportedCoding => 501,
            Refusal::MethodNotAllowed => 405,
            Refusal::Version => 505,
            _ => 400,
        }
    }
}

/// A header index set (one bit per field of the head).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks(u128);

impl Marks {
    fn set(&mut self, i: usize) {
        self.0 |= 1 << i;
    }

    /// Whether field `i` is marked.
    pub fn contains(self, i: usize) -> bool {
        i < 128 && self.0 & (1 << i) != 0
    }
}

/// A parsed request head, borrowing the buffer it was read from. Its fields
/// are `headers[..fields]` of the array given to [`parse_request`].
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'b> {
    /// The method, as sent (case-sensitive).
    pub method: &'b str,
    /// The request target, as sent.
    pub target: &'b str,
    /// Where the path starts in `target` (after an absolute-form authority).
    pub path_start: usize,
    /// HTTP/1.0 or 1.1.
    pub version: Version,
    /// Bytes of the head, the empty line included.
    pub len: usize,
    /// Fields in the head.
    pub fields: usize,
    /// The body's framing.
    pub framing: Framing,
    /// The authority the request is for: the absolute-form target's, else
    /// the Host field's (empty when neither gives one).
    pub authority: &'b [u8],
    /// The connection stays open after this exchange.
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` field (WebSocket ...).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Fields not to forward as they are: hop-by-hop ones (Connection, what it
    /// names, Keep-Alive, Proxy-Connection, TE, Trailer, Proxy-Authorization, Upgrade), the framing ones
    /// (Content-Length, Transfer-Encoding: the proxy writes its own) and
    /// names with an underscore.
    pub drop: Marks,
}

impl RequestHead<'_> {
    /// The path and query (origin-form), whatever form the target had.
    pub fn path(&self) -> &str {
        match &self.target[self.path_start..] {
            "" => "/",
            path => path,
        }
    }
}

/// A parsed response head.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'b> {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: &'b str,
    /// HTTP/1.0 or 1.1.
    pub version: Version,
    /// Bytes of the head, the empty line included.
    pub len: usize,
    /// Fields in the head.
    pub fields: usize,
    /// The body's framing (given the request's method).
    pub framing: Framing,
    /// The backend keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// Fields not to forward as they are (as [`RequestHead::drop`]).
    pub drop: Marks,
}

/// Parses a request head from the start of `buf`: `Ok(None)` until it is
/// complete (more bytes needed, fewer than `max_len` so far).
pub fn parse_request<'b>(
    buf: &'b [u8],
    headers: &mut [Header<'b>; MAX_HEADERS],
    max_len: usize,
) -> Result<Option<RequestHead<'b>>, Refusal> {
    let mut req = httparse::Request::new(headers);
    let Some(len) = head_len(req.parse(buf), buf, max_len)? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Malformed("incomplete request line"));
    };
    let version = if minor == 1 { Version::Http11 } else { Version::Http10 };
    if method == "CONNECT" {
        return Err(Refusal::MethodNotAllowed);
    }
    let fields = req.headers.len();
    let facts = Fields::read(req.headers, version)?;
    let (target_authority, path_start) = target_form(method, target)?;
    let authority = match (target_authority, version, facts.hosts) {
        (_, _, n) if n > 1 => return Err(Refusal::DuplicateHost),
        (_, Version::Http11, 0) => return Err(Refusal::MissingHost),
        (Some(a), _, _) => a,
        (None, _, _) => facts.host,
    };
    if !valid_authority(authority) {
        return Err(Refusal::BadHost);
    }
    let framing = match (facts.chunked, facts.length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Empty,
    };
    Ok(Some(RequestHead {
        method,
        target,
        path_start,
        version,
        len,
        fields,
        framing,
        authority,
        keep_alive: facts.keep_alive(version),
        upgrade: facts.upgrade,
        expect_continue: facts.expect_continue,
        drop: facts.drop,
    }))
}

/// Parses a response head to a request made with `method`: `Ok(None)` until
/// it is complete. 1xx, 204 and 304 responses and answers to HEAD have no
/// body whatever their fields say.
pub fn parse_response<'b>(
    buf: &'b [u8],
    headers: &mut [Header<'b>; MAX_HEADERS],
    max_len: usize,
    method: &str,
) -> Result<Option<ResponseHead<'b>>, Refusal> {
    let mut res = httparse::Response::new(headers);
    let Some(len) = head_len(res.parse(buf), buf, max_len)? else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(Refusal::Malformed("incomplete status line"));
    };
    let version = if minor == 1 { Version::Http11 } else { Version::Http10 };
    let fields = res.headers.len();
    let facts = Fields::read(res.headers, version)?;
    let bodiless = method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (bodiless, facts.chunked, facts.length) {
        (true, _, _) => Framing::Empty,
        (false, true, _) => Framing::Chunked,
        (false, false, Some(n)) => Framing::Length(n),
        (false, false, None) => Framing::UntilClose,
    };
    Ok(Some(ResponseHead {
        status,
        reason: res.reason.unwrap_or(""),
        version,
        len,
        fields,
        framing,
        keep_alive: facts.keep_alive(version) && framing != Framing::UntilClose,
        drop: facts.drop,
    }))
}

/// The length of a complete head from httparse's verdict, `None` while it
/// is incomplete; refused beyond `max_len` or with a bare LF.
fn head_len(parsed: httparse::Result<usize>, buf: &[u8], max_len: usize) -> Result<Option<usize>, Refusal> {
    let len = match parsed {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) if buf.len() >= max_len => return Err(Refusal::TooLarge),
        Ok(Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    if len > max_len {
        return Err(Refusal::TooLarge);
    }
    check_line_ends(&buf[..len])?;
    Ok(Some(len))
}

fn parse_error(e: httparse::Error) -> Refusal {
    match e {
        httparse::Error::TooManyHeaders => Refusal::TooLarge,
        httparse::Error::Version => Refusal::Version,
        httparse::Error::HeaderName => Refusal::Malformed("invalid field name (or whitespace before a colon)"),
        httparse::Error::HeaderValue => Refusal::Malformed("invalid field value (or obs-fold)"),
        httparse::Error::NewLine => Refusal::Malformed("invalid line end"),
        httparse::Error::Status => Refusal::Malformed("invalid status"),
        httparse::Error::Token => Refusal::Malformed("invalid token"),
    }
}

/// httparse takes a bare LF as a line end (RFC 9112 §2.2 allows it); a
/// proxy must not, or it reads lines a backend may read otherwise.
fn check_line_ends(head: &[u8]) -> Result<(), Refusal> {
    let mut from = 0;
    while let Some(i) = head[from..].iter().position(|&b| b == b'\n') {
        let at = from + i;
        if at == 0 || head[at - 1] != b'\r' {
            return Err(Refusal::BareLf);
        }
        from = at + 1;
    }
    Ok(())
}

/// The field names a head's reading looks at (ASCII case-insensitive),
/// told apart by length first: one comparison for most names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    ContentLength,
    TransferEncoding,
    Host,
    Connection,
    Upgrade,
    Expect,
    /// Keep-Alive, Proxy-Connection, TE, Trailer, Proxy-Authorization.
    HopByHop,
    Other,
}

impl Known {
    fn of(name: &str) -> Self {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is("te") => Known::HopByHop,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::Expect,
            7 if is("upgrade") => Known::Upgrade,
            7 if is("trailer") => Known::HopByHop,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::HopByHop,
            14 if is("content-length") => Known::ContentLength,
            16 if is("proxy-connection") => Known::HopByHop,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            19 if is("proxy-authorization") => Known::HopByHop,
            _ => Known::Other,
        }
    }
}

/// What the fields of a head say about framing and the connection.
#[derive(Default)]
struct Fields<'b> {
    length: Option<u64>,
    chunked: bool,
    hosts: usize,
    host: &'b [u8],
    close: bool,
    keep_alive_token: bool,
    upgrade: bool,
    expect_continue: bool,
    drop: Marks,
}

impl<'b> Fields<'b> {
    fn read(headers: &[Header<'b>], version: Version) -> Result<Self, Refusal> {
        let mut f = Fields::default();
        let mut encoding = false;
        let mut upgrade_field = false;
        let mut connection_upgrade = false;
        let mut connection_fields = false;
        for (i, h) in headers.iter().enumerate() {
            let value = trim(h.value);
            match Known::of(h.name) {
                Known::Other => {
                    if h.name.contains('_') {
                        f.drop.set(i);
                    }
                }
                Known::ContentLength => {
                    f.drop.set(i);
                    f.length = Some(merge_length(f.length, value)?);
                }
                Known::TransferEncoding => {
                    f.drop.set(i);
                    if version == Version::Http10 {
                        return Err(Refusal::EncodingInHttp10);
                    }
                    for coding in list(value) {
                        if f.chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                            return Err(Refusal::UnsupportedCoding);
                        }
                        f.chunked = true;
                    }
                    if !f.chunked {
                        return Err(Refusal::UnsupportedCoding);
                    }
                    encoding = true;
                }
                Known::Host => {
                    f.hosts += 1;
                    f.host = value;
                }
                Known::Connection => {
                    f.drop.set(i);
                    connection_fields = true;
                    for token in list(value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            f.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            f.keep_alive_token = true;
                        } else if token.eq_ignore_ascii_case(b"upgrade") {
                            connection_upgrade = true;
                        }
                    }
                }
                Known::Upgrade => {
                    f.drop.set(i);
                    upgrade_field = true;
                }
                Known::Expect => f.expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
                Known::HopByHop => f.drop.set(i),
            }
        }
        if encoding && f.length.is_some() {
            return Err(Refusal::LengthAndEncoding);
        }
        f.upgrade = upgrade_field && connection_upgrade;
        // Fields the Connection field names are this hop's too (`keep-alive`
        // and `upgrade` name fields dropped anyway, and are skipped).
        if connection_fields {
            for h in headers.iter().filter(|h| Known::of(h.name) == Known::Connection) {
                for token in list(trim(h.value)) {
                    if token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"upgrade") {
                        continue;
                    }
                    for (i, other) in headers.iter().enumerate() {
                        if other.name.as_bytes().eq_ignore_ascii_case(token) {
                            f.drop.set(i);
                        }
                    }
                }
            }
        }
        Ok(f)
    }

    fn keep_alive(&self, version: Version) -> bool {
        match version {
            Version::Http11 => !self.close,
            Version::Http10 => self.keep_alive_token && !self.close,
        }
    }
}

/// One Content-Length field merged with what earlier ones said: a decimal
/// number, leading zeros allowed and dropped (the proxy writes the number
/// anew), the same as any before. A list (`5, 5`, which RFC 9110 §8.6 lets a
/// recipient take) is refused, as hyper refuses it: one reading everywhere.
fn merge_length(before: Option<u64>, value: &[u8]) -> Result<u64, Refusal> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::BadLength);
    }
    let digits = &value[value.iter().position(|&b| b != b'0').unwrap_or(value.len() - 1)..];
    if digits.len() > MAX_LENGTH_DIGITS {
        return Err(Refusal::BadLength);
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match before {
        Some(b) if b != n => Err(Refusal::BadLength),
        _ => Ok(n),
    }
}

/// The elements of a comma-separated field value, trimmed, empty ones skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

/// `value` without leading and trailing spaces and tabs.
fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end.max(start)]
}

/// The authority of an absolute-form target and where its path starts;
/// `(None, 0)` for origin-form and `*` (OPTIONS only).
fn target_form<'b>(method: &str, target: &'b str) -> Result<(Option<&'b [u8]>, usize), Refusal> {
    if target.starts_with('/') {
        return Ok((None, 0));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok((None, 0))
        } else {
            Err(Refusal::Malformed("`*` target for a method other than OPTIONS"))
        };
    }
    let scheme_end = target
        .find("://")
        .ok_or(Refusal::Malformed("a target in no known form"))?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(Refusal::Malformed("an absolute-form target that is not http(s)"));
    }
    let rest = scheme_end + 3;
    let end = target[rest..].find(['/', '?', '#']).map_or(target.len(), |i| rest + i);
    let authority = &target.as_bytes()[rest..end];
    if authority.is_empty() {
        return Err(Refusal::BadHost);
    }
    Ok((Some(authority), end))
}

/// A host with an optional port: letters, digits, `-._~`, `%` escapes and
/// sub-delims, or an IPv6 literal in brackets; no userinfo, no path.
fn valid_authority(authority: &[u8]) -> bool {
    if authority.len() > 255 {
        return false;
    }
    let (host, port) = match authority.iter().rposition(|&b| b == b':') {
        Some(i) if !authority.ends_with(b"]") => (&authority[..i], &authority[i + 1..]),
        _ => (authority, &b""[..]),
    };
    if !port.iter().all(u8::is_ascii_digit) || port.len() > 5 {
        return false;
    }
    if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        return !inner.is_empty() && inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    host.iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b))
}

#[cfg(test)]
mod tests;
