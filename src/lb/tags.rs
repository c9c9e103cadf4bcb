//! Service tags of one Consul instance: what PanteraS's `haproxy*` tags (and Fabio's
//! `urlprefix-` tags) ask of the load balancer.
//!
//! ```text
//!  instance tags ──parse_tags──▶ InstanceTags (+ one warning per bad tag)
//!                                  │  http, routes, tcp_port, weight, httpchk, fabio
//!                                  ▼
//!                    table::RoutingTable::build (union over a service's instances)
//! ```
//!
//! Parsing is lenient, as a migration path must be: a bad tag is reported and
//! ignored, never fatal, so one typo cannot take a service out of the load balancer.
//! Tags we do not know belong to someone else (services carry many) and are ignored
//! silently. Keys are matched case-sensitively, exactly as PanteraS's template did.

/// Weight of an instance without `haproxy_weight`: what the PanteraS README promised
/// (its template actually left HAProxy's default of 1).
pub const DEFAULT_WEIGHT: u16 = 100;
/// Largest weight HAProxy accepts.
pub const MAX_WEIGHT: u16 = 256;

/// The tag that puts an instance in HTTP routing by Host name.
const TAG_HTTP: &str = "haproxy";
/// Fabio's default tag prefix (`registry.consul.tagprefix`).
const FABIO_PREFIX: &str = "urlprefix-";

/// What the tags of one Consul service instance ask of the load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTags {
    /// Tag `haproxy`: route HTTP requests by Host name (`svc.service.consul`, ...).
    pub http: bool,
    /// `haproxy_route=/minions`: path prefixes routed whatever the Host. Normalised:
    /// leading `/`, no trailing `/` (except `/` itself), no duplicates, in tag order.
    pub routes: Vec<String>,
    /// `haproxy_tcp=5432`: a TCP listener on this port forwards to the instance.
    pub tcp_port: Option<u16>,
    /// `haproxy_weight=N` (0..=256); 0 takes no new traffic. Default [`DEFAULT_WEIGHT`].
    pub weight: u16,
    /// `haproxy_httpchk=...`: the active HTTP check; `None` means a TCP connect check.
    pub httpchk: Option<HttpCheck>,
    /// Fabio `urlprefix-<host>/<path>` routes, kept so users who moved to Fabio can
    /// come back without retagging. No duplicates, in tag order.
    pub fabio: Vec<UrlPrefix>,
}

// Not derived: a derived Default would say weight 0, which means "no traffic".
impl Default for InstanceTags {
    fn default() -> Self {
        Self {
            http: false,
            routes: Vec::new(),
            tcp_port: None,
            weight: DEFAULT_WEIGHT,
            httpchk: None,
            fabio: Vec::new(),
        }
    }
}

impl InstanceTags {
    /// True when the load balancer has anything to do with this instance.
    pub fn wants_lb(&self) -> bool {
        self.takes_http() || self.tcp_port.is_some()
    }

    /// True when the instance takes HTTP traffic: tagged `haproxy`, or carrying a
    /// path route or a Fabio prefix (which make no sense without HTTP).
    pub fn takes_http(&self) -> bool {
        self.http || !self.routes.is_empty() || !self.fabio.is_empty()
    }
}

/// An active HTTP health check, from HAProxy's `option httpchk` syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Request method, an HTTP token as written (`GET` when only a path was given).
    pub method: String,
    /// Request target; starts with `/`.
    pub path: String,
    /// `HTTP/1.1` (the default) or `HTTP/1.0`. The checker adds `Host` for HTTP/1.1
    /// when the tag did not.
    pub version: String,
    /// Extra header lines in tag order (name as written, value trimmed).
    pub headers: Vec<(String, String)>,
}

/// A Fabio `urlprefix-` route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPrefix {
    /// Host the route is limited to: lower-case, without port or trailing dot.
    /// `None` routes by path whatever the Host, like `haproxy_route`.
    pub host: Option<String>,
    /// Path prefix, normalised like [`InstanceTags::routes`]. Matching is by whole
    /// path segments, where Fabio compared strings: `/api` does not take `/apix`.
    pub path: String,
}

/// The `key=value` tags of PanteraS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Route,
    Tcp,
    Weight,
    HttpChk,
}

impl Key {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "haproxy_route" => Some(Self::Route),
            "haproxy_tcp" => Some(Self::Tcp),
            "haproxy_weight" => Some(Self::Weight),
            "haproxy_httpchk" => Some(Self::HttpChk),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Route => "haproxy_route",
            Self::Tcp => "haproxy_tcp",
            Self::Weight => "haproxy_weight",
            Self::HttpChk => "haproxy_httpchk",
        }
    }
}

/// Why a tag was ignored. Private: callers get the rendered warning.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum TagError {
    #[error("no value (expected {0}=...)")]
    MissingValue(&'static str),
    #[error("empty path")]
    EmptyPath,
    #[error("path contains whitespace, control characters, '?' or '#'")]
    BadPathChars,
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
    #[error("weight {0:?} is not a number in 0..={MAX_WEIGHT}")]
    BadWeight(String),
    #[error("an earlier {key} tag already says {kept}; keeping that")]
    Conflict { key: &'static str, kept: String },
    #[error("empty health check")]
    EmptyCheck,
    #[error("method {0:?} is not an HTTP token")]
    BadMethod(String),
    #[error("method {0:?} is not one a health check may send (GET, HEAD or OPTIONS)")]
    UnsafeMethod(String),
    #[error("check path {0:?} must start with '/' and be printable ASCII")]
    BadCheckPath(String),
    #[error("HTTP version {0:?} is not HTTP/1.0 or HTTP/1.1")]
    BadVersion(String),
    #[error("request line has more than method, path and version")]
    TooManyWords,
    #[error("header line {0:?} is not `Name: value`")]
    BadHeader(String),
    #[error("host {0:?} is not a host name")]
    BadHost(String),
    #[error("wildcard host {0:?} is not supported")]
    WildcardHost(String),
    #[error("fabio TCP routes are not supported; tag haproxy_tcp=<port> instead")]
    FabioTcp,
    #[error("fabio backend protocol {0:?} is not supported (backends are plain HTTP)")]
    FabioProto(String),
    #[error("no host or path after urlprefix-")]
    EmptyFabio,
}

/// Parses tags; returns the result and one human-readable warning per bad tag (the
/// bad tag is ignored, never fatal). When two tags set the same single value
/// (port, weight, check) differently, the first wins and the second is warned about.
pub fn parse_tags(tags: &[String]) -> (InstanceTags, Vec<String>) {
    let mut out = InstanceTags::default();
    let mut weight_seen = false;
    let mut warnings = Vec::new();
    for raw in tags {
        // Registrator splits SERVICE_TAGS on commas only: "haproxy, haproxy_tcp=1"
        // leaves a space that nobody meant.
        let tag = raw.trim();
        if tag == TAG_HTTP {
            out.http = true;
            continue;
        }
        if let Some(rest) = tag.strip_prefix(FABIO_PREFIX) {
            match parse_fabio(rest) {
                Ok((prefix, ignored)) => {
                    if !ignored.is_empty() {
                        warnings.push(format!(
                            "tag {tag:?}: fabio options ignored ({}); only host and path are used",
                            ignored.join(" ")
                        ));
                    }
                    if !out.fabio.contains(&prefix) {
                        out.fabio.push(prefix);
                    }
                }
                Err(e) => warnings.push(format!("tag {tag:?} ignored: {e}")),
            }
            continue;
        }
        let (key, value) = match tag.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tag, None),
        };
        let Some(key) = Key::from_name(key) else {
            continue; // someone else's tag
        };
        let result = match value.map(str::trim) {
            None | Some("") => Err(TagError::MissingValue(key.name())),
            Some(value) => apply(&mut out, &mut weight_seen, key, value),
        };
        if let Err(e) = result {
            warnings.push(format!("tag {tag:?} ignored: {e}"));
        }
    }
    (out, warnings)
}

/// Applies one `haproxy_*` key with a non-empty value.
fn apply(out: &mut InstanceTags, weight_seen: &mut bool, key: Key, value: &str) -> Result<(), TagError> {
    let conflict = |kept: String| TagError::Conflict { key: key.name(), kept };
    match key {
        Key::Route => {
            let route = normalize_path(value)?;
            if !out.routes.contains(&route) {
                out.routes.push(route);
            }
        }
        Key::Tcp => {
            let port = value
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| TagError::BadPort(value.to_owned()))?;
            match out.tcp_port {
                Some(kept) if kept != port => return Err(conflict(kept.to_string())),
                _ => out.tcp_port = Some(port),
            }
        }
        Key::Weight => {
            let weight = value
                .parse::<u16>()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| TagError::BadWeight(value.to_owned()))?;
            if *weight_seen && out.weight != weight {
                return Err(conflict(out.weight.to_string()));
            }
            out.weight = weight;
            *weight_seen = true;
        }
        Key::HttpChk => {
            let check = parse_httpchk(value)?;
            match &out.httpchk {
                Some(kept) if *kept != check => return Err(conflict(format!("{} {}", kept.method, kept.path))),
                _ => out.httpchk = Some(check),
            }
        }
    }
    Ok(())
}

/// Normalises a path prefix: leading `/` added, trailing `/` removed (`/` stays).
/// Characters that cannot appear in a query-less request path are refused, since
/// such a route could never match.
fn normalize_path(raw: &str) -> Result<String, TagError> {
    if raw.is_empty() {
        return Err(TagError::EmptyPath);
    }
    if raw
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(TagError::BadPathChars);
    }
    let trimmed = raw.trim_end_matches('/');
    let trimmed = trimmed.strip_prefix('/').unwrap_or(trimmed);
    Ok(format!("/{trimmed}"))
}

/// Parses an HAProxy `option httpchk` argument list as PanteraS users wrote it:
/// `GET /`, `GET /check HTTP/1.0`, `GET /check HTTP/1.1\r\nHost:\ www.example.com`
/// (escaped or real CR LF before each header), or a bare `/path` meaning GET.
fn parse_httpchk(value: &str) -> Result<HttpCheck, TagError> {
    let text = unescape(value);
    let mut lines = text.split(['\r', '\n']).filter(|l| !l.trim().is_empty());
    let request_line = lines.next().ok_or(TagError::EmptyCheck)?;
    let words: Vec<&str> = request_line.split_ascii_whitespace().collect();
    let (method, path, version) = match words.as_slice() {
        [path] => ("GET", *path, None),
        [method, path] => (*method, *path, None),
        [method, path, version] => (*method, *path, Some(*version)),
        [] => return Err(TagError::EmptyCheck),
        _ => return Err(TagError::TooManyWords),
    };
    if !is_token(method) {
        return Err(TagError::BadMethod(method.to_owned()));
    }
    // Anyone who can register a service chooses the address the checker sends
    // this to every 2 s: only methods that change nothing.
    if !matches!(method, "GET" | "HEAD" | "OPTIONS") {
        return Err(TagError::UnsafeMethod(method.to_owned()));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TagError::BadCheckPath(path.to_owned()));
    }
    let version = match version {
        None => "HTTP/1.1".to_owned(),
        Some(v) if v.eq_ignore_ascii_case("HTTP/1.1") || v.eq_ignore_ascii_case("HTTP/1.0") => v.to_ascii_uppercase(),
        Some(v) => return Err(TagError::BadVersion(v.to_owned())),
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, val) = line
            .split_once(':')
            .ok_or_else(|| TagError::BadHeader(line.to_owned()))?;
        let val = val.trim_matches([' ', '\t']);
        // obs-text (bytes >= 0x80) is legal in a field value; controls but tab are not.
        if !is_token(name) || val.chars().any(|c| c.is_control() && c != '\t') {
            return Err(TagError::BadHeader(line.to_owned()));
        }
        headers.push((name.to_owned(), val.to_owned()));
    }
    Ok(HttpCheck {
        method: method.to_owned(),
        path: path.to_owned(),
        version,
        headers,
    })
}

/// Undoes the escapes of HAProxy's config parser (`\ `, `\\`, `\#`, `\"`, `\'`,
/// `\r`, `\n`, `\t`); any other backslash is kept as written, as HAProxy does.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(c @ (' ' | '\\' | '#' | '"' | '\'')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// RFC 9110 `token`: what a method or a header name may be made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses what follows `urlprefix-`: `<host>/<path>` or `/<path>`, then Fabio's
/// space-separated options. Returns the prefix and the options we ignore.
fn parse_fabio(rest: &str) -> Result<(UrlPrefix, Vec<&str>), TagError> {
    let mut words = rest.split_ascii_whitespace();
    let target = words.next().ok_or(TagError::EmptyFabio)?;
    let mut ignored = Vec::new();
    for option in words {
        match option.strip_prefix("proto=") {
            Some("http") => {}
            Some(p) if p.starts_with("tcp") => return Err(TagError::FabioTcp),
            Some(p) => return Err(TagError::FabioProto(p.to_owned())),
            None => ignored.push(option),
        }
    }
    let (host, path) = match target.find('/') {
        Some(at) => target.split_at(at),
        // `urlprefix-example.com`: the whole host.
        None => (target, "/"),
    };
    let host = if host.is_empty() { None } else { Some(fabio_host(host)?) };
    let path = normalize_path(path)?;
    Ok((UrlPrefix { host, path }, ignored))
}

/// Validates and normalises the host of a Fabio prefix the way request Hosts are
/// normalised before lookup (see [`bare_host`]).
fn fabio_host(raw: &str) -> Result<String, TagError> {
    let host = bare_host(raw);
    if host.is_empty() {
        // `urlprefix-:3306` is how Fabio spells a TCP listener.
        return Err(if raw.starts_with(':') {
            TagError::FabioTcp
        } else {
            TagError::BadHost(raw.to_owned())
        });
    }
    if host.contains('*') {
        return Err(TagError::WildcardHost(raw.to_owned()));
    }
    let bracketed = raw.starts_with('[');
    let valid = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' || (bracketed && b == b':'));
    if !valid {
        return Err(TagError::BadHost(raw.to_owned()));
    }
    Ok(host.to_ascii_lowercase())
}

/// A Host header (or configured host name) reduced to the name that is looked up:
/// surrounding whitespace, `:port`, IPv6 brackets and one trailing dot removed. Case
/// is left alone so the caller can skip lower-casing when it is already lower-case.
/// Allocation-free: it runs on every request.
pub(super) fn bare_host(raw: &str) -> &str {
    let host = raw.trim();
    let host = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(inside, _)| inside),
        // One colon is a port; more are an unbracketed IPv6 address, kept whole.
        None => match host.split_once(':') {
            Some((name, port)) if !port.contains(':') => name,
            _ => host,
        },
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tags: &[&str]) -> (InstanceTags, Vec<String>) {
        parse_tags(&tags.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    }

    /// Parses tags that must all be accepted without a warning.
    fn clean(tags: &[&str]) -> InstanceTags {
        let (t, w) = parse(tags);
        assert!(w.is_empty(), "unexpected warnings for {tags:?}: {w:?}");
        t
    }

    /// Parses one tag that must be rejected with exactly one warning naming it.
    fn rejected(tag: &str) -> String {
        let (t, w) = parse(&[tag]);
        assert_eq!(t, InstanceTags::default(), "{tag:?} changed the result");
        assert_eq!(w.len(), 1, "{tag:?}: {w:?}");
        assert!(w[0].contains(&format!("{:?}", tag.trim())), "{w:?}");
        w[0].clone()
    }

    fn check(method: &str, path: &str, version: &str, headers: &[(&str, &str)]) -> HttpCheck {
        HttpCheck {
            method: method.into(),
            path: path.into(),
            version: version.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        }
    }

    fn prefix(host: Option<&str>, path: &str) -> UrlPrefix {
        UrlPrefix {
            host: host.map(Into::into),
            path: path.into(),
        }
    }

    #[test]
    fn no_or_unknown_tags_mean_nothing_for_the_lb() {
        let t = clean(&[]);
        assert_eq!(t, InstanceTags::default());
        assert_eq!(t.weight, DEFAULT_WEIGHT);
        assert!(!t.wants_lb());
        let t = clean(&[
            "production",
            "version=3",
            "HAPROXY",
            "Haproxy_route=/x",
            "haproxy_maxconn=5",
            "traefik.enable",
        ]);
        assert_eq!(t, InstanceTags::default());
    }

    #[test]
    fn haproxy_tag_asks_for_http_routing() {
        let t = clean(&["haproxy", " haproxy "]);
        assert!(t.http && t.takes_http() && t.wants_lb());
    }

    #[test]
    fn routes_are_normalised_and_deduplicated() {
        let t = clean(&[
            "haproxy_route=/minions",
            "haproxy_route=minions",
            "haproxy_route=/minions/",
            "haproxy_route=/a/b//",
            "haproxy_route=/",
            "haproxy_route=//",
            " haproxy_route= /c ",
        ]);
        assert_eq!(t.routes, ["/minions", "/a/b", "/", "/c"]);
        assert!(!t.http && t.takes_http() && t.wants_lb(), "a route alone is enough");
    }

    #[test]
    fn bad_routes_are_warned_and_ignored() {
        assert!(rejected("haproxy_route=").contains("no value"));
        assert!(rejected("haproxy_route").contains("no value"));
        assert!(rejected("haproxy_route=/a b").contains("whitespace"));
        rejected("haproxy_route=/a\tb");
        rejected("haproxy_route=/a?b=1");
        rejected("haproxy_route=/a#top");
        // The good ones in the same list survive.
        let (t, w) = parse(&["haproxy_route=/ok", "haproxy_route=/not ok"]);
        assert_eq!((t.routes, w.len()), (vec!["/ok".to_string()], 1));
    }

    #[test]
    fn tcp_port_tag() {
        let t = clean(&["haproxy_tcp=5432", "haproxy_tcp=5432"]);
        assert_eq!(t.tcp_port, Some(5432));
        assert!(
            !t.takes_http() && t.wants_lb(),
            "TCP alone is load-balanced, not HTTP-routed"
        );
        assert_eq!(clean(&["haproxy_tcp=1"]).tcp_port, Some(1));
        assert_eq!(clean(&["haproxy_tcp=65535"]).tcp_port, Some(65535));
        for bad in [
            "haproxy_tcp=0",
            "haproxy_tcp=65536",
            "haproxy_tcp=-1",
            "haproxy_tcp=db",
            "haproxy_tcp=",
        ] {
            rejected(bad);
        }
        let (t, w) = parse(&["haproxy_tcp=5432", "haproxy_tcp=5433"]);
        assert_eq!(t.tcp_port, Some(5432), "first wins");
        assert!(w.len() == 1 && w[0].contains("5432"), "{w:?}");
    }

    #[test]
    fn weight_tag() {
        assert_eq!(clean(&["haproxy_weight=0"]).weight, 0);
        assert_eq!(clean(&["haproxy_weight=256"]).weight, 256);
        assert_eq!(clean(&["haproxy_weight=7", "haproxy_weight=7"]).weight, 7);
        for bad in [
            "haproxy_weight=257",
            "haproxy_weight=1000000",
            "haproxy_weight=-1",
            "haproxy_weight=1.5",
            "haproxy_weight=heavy",
        ] {
            let w = rejected(bad);
            assert!(w.contains("0..=256"), "{w}");
        }
        let (t, w) = parse(&["haproxy_weight=10", "haproxy_weight=20"]);
        assert_eq!((t.weight, w.len()), (10, 1));
        // A bad weight keeps the default, not a later or earlier zero.
        let (t, _) = parse(&["haproxy_weight=x"]);
        assert_eq!(t.weight, DEFAULT_WEIGHT);
        // Weight alone does not put the instance in the LB.
        assert!(!clean(&["haproxy_weight=5"]).wants_lb());
    }

    #[test]
    fn httpchk_forms() {
        assert_eq!(
            clean(&["haproxy_httpchk=GET /"]).httpchk,
            Some(check("GET", "/", "HTTP/1.1", &[]))
        );
        assert_eq!(
            clean(&["haproxy_httpchk=GET /check HTTP/1.0"]).httpchk,
            Some(check("GET", "/check", "HTTP/1.0", &[]))
        );
        assert_eq!(
            clean(&["haproxy_httpchk=HEAD /check http/1.1"]).httpchk,
            Some(check("HEAD", "/check", "HTTP/1.1", &[]))
        );
        assert_eq!(
            clean(&["haproxy_httpchk=/health"]).httpchk,
            Some(check("GET", "/health", "HTTP/1.1", &[]))
        );
        let want = Some(check("GET", "/check", "HTTP/1.1", &[("Host", "www.example.com")]));
        // As written in SERVICE_TAGS: literal backslash-r backslash-n and an escaped space.
        assert_eq!(
            clean(&[r"haproxy_httpchk=GET /check HTTP/1.1\r\nHost:\ www.example.com"]).httpchk,
            want
        );
        assert_eq!(
            clean(&["haproxy_httpchk=GET /check HTTP/1.1\r\nHost: www.example.com\r\n"]).httpchk,
            want
        );
        assert_eq!(
            clean(&[r"haproxy_httpchk=GET /check HTTP/1.1\nHost:www.example.com"]).httpchk,
            want
        );
        assert_eq!(
            clean(&[r"haproxy_httpchk=GET /c\r\nHost:\ a\r\nX-Check:\ yes\ please\r\n"]).httpchk,
            Some(check(
                "GET",
                "/c",
                "HTTP/1.1",
                &[("Host", "a"), ("X-Check", "yes please")]
            ))
        );
        // A check alone does not put the instance in the LB.
        assert!(!clean(&["haproxy_httpchk=GET /"]).wants_lb());
    }

    #[test]
    fn bad_httpchk_is_warned_and_ignored() {
        assert!(rejected("haproxy_httpchk=").contains("no value"));
        assert!(rejected("haproxy_httpchk= ").contains("no value"));
        assert!(rejected(r"haproxy_httpchk=\r\n").contains("empty"));
        assert!(rejected("haproxy_httpchk=G(T /").contains("method"));
        for unsafe_method in ["POST", "DELETE", "PUT", "PATCH", "get"] {
            let why = rejected(&format!("haproxy_httpchk={unsafe_method} /api/units/lb/restart"));
            assert!(why.contains("GET, HEAD or OPTIONS"), "{unsafe_method}: {why}");
        }
        for ok in ["GET /", "HEAD /health", "OPTIONS /"] {
            assert!(
                clean(&["haproxy", &format!("haproxy_httpchk={ok}")]).httpchk.is_some(),
                "{ok}"
            );
        }
        assert!(rejected("haproxy_httpchk=GET").contains("must start with '/'"));
        assert!(rejected("haproxy_httpchk=GET check").contains("must start with '/'"));
        assert!(rejected("haproxy_httpchk=GET /caf\u{e9}").contains("must start with '/'"));
        assert!(rejected("haproxy_httpchk=GET / HTTP/2").contains("HTTP version"));
        assert!(rejected("haproxy_httpchk=GET / HTTP/1.1 extra").contains("more than"));
        assert!(rejected(r"haproxy_httpchk=GET /\r\nno colon here").contains("Name: value"));
        assert!(rejected(r"haproxy_httpchk=GET /\r\nBad Name: x").contains("Name: value"));
        let (t, w) = parse(&[
            "haproxy_httpchk=GET /a",
            "haproxy_httpchk=GET /b",
            "haproxy_httpchk=GET /a",
        ]);
        assert_eq!(t.httpchk.map(|c| c.path), Some("/a".into()));
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn unescape_follows_haproxy() {
        assert_eq!(unescape(r"a\ b\\c\#d\r\n\t"), "a b\\c#d\r\n\t");
        assert_eq!(unescape(r"\q\"), r"\q\");
        assert_eq!(unescape("caf\u{e9}\\"), "caf\u{e9}\\");
    }

    #[test]
    fn fabio_prefixes() {
        let t = clean(&[
            "urlprefix-/api",
            "urlprefix-/api/",
            "urlprefix-Example.COM:8080/Shop/",
            "urlprefix-example.com./shop",
            "urlprefix-static.example.com/",
            "urlprefix-bare.example.com",
            "urlprefix-/ proto=http",
        ]);
        assert_eq!(
            t.fabio,
            [
                prefix(None, "/api"),
                prefix(Some("example.com"), "/Shop"),
                prefix(Some("example.com"), "/shop"),
                prefix(Some("static.example.com"), "/"),
                prefix(Some("bare.example.com"), "/"),
                prefix(None, "/"),
            ]
        );
        assert!(!t.http && t.takes_http() && t.wants_lb());
    }

    #[test]
    fn fabio_options_and_bad_prefixes() {
        // Options we do not implement are named, but the route is kept.
        let (t, w) = parse(&["urlprefix-/x strip=/x tlsskipverify=true"]);
        assert_eq!(t.fabio, [prefix(None, "/x")]);
        assert!(w.len() == 1 && w[0].contains("strip=/x tlsskipverify=true"), "{w:?}");
        assert!(rejected("urlprefix-:3306 proto=tcp").contains("TCP"));
        assert!(rejected("urlprefix-:3306").contains("TCP"));
        assert!(rejected("urlprefix-/x proto=https").contains("\"https\""));
        assert!(rejected("urlprefix-*.example.com/").contains("wildcard"));
        assert!(rejected("urlprefix-ex!ample.com/").contains("host"));
        assert!(rejected("urlprefix-").contains("no host or path"));
        assert!(rejected("urlprefix-/a?b").contains("path"));
    }

    #[test]
    fn bare_host_strips_port_brackets_and_dot() {
        assert_eq!(bare_host("Web.Service.Consul"), "Web.Service.Consul");
        assert_eq!(bare_host("web.service.consul.:8080"), "web.service.consul");
        assert_eq!(bare_host("web.service.consul."), "web.service.consul");
        assert_eq!(bare_host(" web "), "web");
        assert_eq!(bare_host("[::1]:80"), "::1");
        assert_eq!(bare_host("[::1]"), "::1");
        assert_eq!(bare_host("::1"), "::1");
        assert_eq!(bare_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(bare_host(""), "");
        assert_eq!(bare_host(":80"), "");
        assert_eq!(bare_host("["), "");
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let pieces = [
            "haproxy_httpchk=",
            "haproxy_route=",
            "haproxy_tcp=",
            "haproxy_weight=",
            "urlprefix-",
            "\\",
            "\\r\\n",
            "\r\n",
            " ",
            ":",
            "/",
            "[",
            "]",
            "é",
            "GET",
            "HTTP/1.1",
            "=",
            "*",
            "\u{0}",
        ];
        let mut x: u32 = 7;
        for _ in 0..3000 {
            let mut tag = String::new();
            for _ in 0..(x % 7) {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                tag.push_str(pieces[(x >> 24) as usize % pieces.len()]);
            }
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            let _ = parse_tags(&[tag.clone()]);
            let _ = bare_host(&tag);
        }
    }
}
