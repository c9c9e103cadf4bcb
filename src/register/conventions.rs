//! Registrator's conventions: what a container says about itself in its
//! environment and labels (`SERVICE_NAME`, `SERVICE_TAGS`, `SERVICE_80_NAME`,
//! `SERVICE_CHECK_HTTP` ...), turned into one service definition per port.
//! Pure: no Docker, no Consul; the first step of the `register` component
//! (issue 19), which feeds it a container's facts.
//!
//! ```text
//!  env ["SERVICE_TAGS=haproxy", ...] + labels {SERVICE_80_NAME: web} + ports + image
//!      ──services()──▶ per port: Ok(ServiceDef { name, id, tags, meta, check }) | Err(Refused)
//! ```
//!
//! As registrator reads them: labels win over the environment; a key for a
//! port (`SERVICE_<port>_<KEY>`) wins over the general one; the name defaults
//! to the image's base name, with `-<port>` when the container publishes
//! several ports; `SERVICE_IGNORE` (or `SERVICE_<port>_IGNORE`) skips;
//! every other `SERVICE_<KEY>` becomes Consul Meta. `SERVICE_TAGS` splits at
//! commas, `\,` being a comma inside a tag.
//!
//! Everything here is untrusted input (whoever starts a container writes
//! it): a name must be a DNS label, tags and Meta are bounded in count and
//! size and hold no control characters, durations are bounded. A port whose
//! definition breaks a rule is refused as a whole, with the reason; the
//! container's other ports are unaffected.

use std::collections::BTreeMap;
use std::time::Duration;

/// Tags one service may carry.
pub const MAX_TAGS: usize = 64;
/// Meta pairs one service may carry (Consul's own limit).
pub const MAX_META: usize = 64;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 255;
/// Longest Meta key (Consul: 128) and value (Consul: 512), in bytes.
pub const MAX_META_KEY_LEN: usize = 128;
/// Longest Meta value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 512;
/// `SERVICE_*` keys read from one container (env and labels together); more
/// refuse the whole container.
pub const MAX_KEYS: usize = 256;
/// Meta keys starting with this are the register component's own
/// (ownership); a container may not set them.
pub const RESERVED_META: &str = "wayfinder";
/// Check intervals and timeouts must lie within this range.
pub const CHECK_TIMES: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// One port a container exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    /// The container's own port.
    pub private: u16,
    /// `udp` rather than `tcp`.
    pub udp: bool,
}

/// What a container says about itself.
#[derive(Debug, Clone)]
pub struct Container<'a> {
    /// Its name, without Docker's leading `/`.
    pub name: &'a str,
    /// Its image reference (`registry:5000/team/app:1.2`).
    pub image: &'a str,
    /// `KEY=VALUE` entries of its environment.
    pub env: &'a [String],
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The ports it exposes (published or not: the address mode decides which count).
    pub ports: &'a [Port],
}

/// The health check a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What is checked.
    pub probe: Probe,
    /// `SERVICE_CHECK_INTERVAL` (default 10 s).
    pub interval: Duration,
    /// `SERVICE_CHECK_TIMEOUT` (default 5 s).
    pub timeout: Duration,
}

/// What a [`Check`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `SERVICE_CHECK_HTTP=/health`: GET that path on the service's address.
    Http(String),
    /// `SERVICE_CHECK_TCP=true`: a TCP connect to the service's address.
    Tcp,
}

/// One service to register for one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    /// The port it is for.
    pub port: Port,
    /// The Consul service name (a DNS label, lower case).
    pub name: String,
    /// `SERVICE_ID` when given (else the component makes one of host,
    /// container and port).
    pub id: Option<String>,
    /// Its tags, in order, without duplicates.
    pub tags: Vec<String>,
    /// Consul Meta from the other `SERVICE_*` keys (lower-case keys).
    pub meta: BTreeMap<String, String>,
    /// The check it asked for, if any.
    pub check: Option<Check>,
}

/// Why a container's port (or the whole container) is not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// More `SERVICE_*` keys than [`MAX_KEYS`].
    #[error("{0} SERVICE_* keys (at most {MAX_KEYS})")]
    TooManyKeys(usize),
    /// The name is not a DNS label.
    #[error("`{0}` is not a service name: 1-63 letters, digits and `-`, not starting or ending with `-`")]
    Name(String),
    /// A tag is too long, or holds a control character.
    #[error("tag `{0}` is refused: at most {MAX_TAG_LEN} bytes, no control characters")]
    Tag(String),
    /// A tag the lb would ignore (its warning).
    #[error("{0}")]
    LbTag(String),
    /// More tags than [`MAX_TAGS`].
    #[error("{0} tags (at most {MAX_TAGS})")]
    TooManyTags(usize),
    /// More Meta pairs than [`MAX_META`], or one too long or with a bad key.
    #[error(
        "meta `{0}` is refused: at most {MAX_META} pairs, keys of letters, digits, `_` and `-` up to {MAX_META_KEY_LEN} bytes, values up to {MAX_META_VALUE_LEN}"
    )]
    Meta(String),
    /// `SERVICE_ID` is empty, too long, or holds characters Consul refuses.
    #[error("`{0}` is not a service ID: 1-128 letters, digits, `-`, `_`, `.` and `:`")]
    Id(String),
    /// A check setting that cannot be used.
    #[error("check: {0}")]
    Check(String),
}

/// The service definitions of `container`'s ports: one entry per port it
/// registers (ignored ports have none), each a definition or why it is refused.
pub fn services(container: &Container<'_>) -> Result<Vec<Result<ServiceDef, Refused>>, Refused> {
    let keys = service_keys(container);
    if keys.len() > MAX_KEYS {
        return Err(Refused::TooManyKeys(keys.len()));
    }
    let several = container.ports.len() > 1;
    let base = image_name(container.image);
    Ok(container
        .ports
        .iter()
        .filter_map(|port| {
            let meta = for_port(&keys, port.private);
            if meta.get("ignore").is_some_and(|(v, _)| !v.is_empty()) {
                return None;
            }
            Some(definition(*port, meta, &base, several))
        })
        .collect())
}

/// Every `SERVICE_*` key, lower-cased without the prefix: the environment's
/// first, then the labels' over them.
fn service_keys(container: &Container<'_>) -> Vec<(String, String)> {
    let env = container.env.iter().filter_map(|e| e.split_once('='));
    let labels = container.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    env.chain(labels)
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("SERVICE_")?;
            (!key.is_empty()).then(|| (key.to_ascii_lowercase(), v.to_string()))
        })
        .collect()
}

/// The keys as they apply to `port`: `<port>_<key>` wins over `<key>`; a
/// later source (labels) over an earlier one (env). Values are `(value,
/// port-specific)`.
fn for_port(keys: &[(String, String)], port: u16) -> BTreeMap<String, (String, bool)> {
    let mut out: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for (key, value) in keys {
        let (key, specific) = match key.split_once('_') {
            Some((p, rest)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                if p.parse::<u16>() != Ok(port) {
                    continue;
                }
                (rest.to_string(), true)
            }
            _ => (key.clone(), false),
        };
        match out.get(&key) {
            Some((_, true)) if !specific => {}
            _ => {
                out.insert(key, (value.clone(), specific));
            }
        }
    }
    out
}

/// `registry:5000/team/app:1.2@sha256:…` → `app`.
fn image_name(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last).to_ascii_lowercase()
}

fn definition(
    port: Port,
    mut keys: BTreeMap<String, (String, bool)>,
    base: &str,
    several: bool,
) -> Result<ServiceDef, Refused> {
    let name = match keys.remove("name") {
        Some((name, _)) => name.trim().to_ascii_lowercase(),
        None if several => format!("{base}-{}", port.private),
        None => base.to_string(),
    };
    if !is_dns_label(&name) {
        return Err(Refused::Name(name));
    }
    let id = match keys.remove("id") {
        Some((id, _)) => {
            let ok = !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
            if !ok {
                return Err(Refused::Id(id));
            }
            Some(id)
        }
        None => None,
    };
    let tags = match keys.remove("tags") {
        Some((text, _)) => checked_tags(&text)?,
        None => Vec::new(),
    };
    let check = check(&mut keys)?;
    keys.remove("ignore");
    let meta: BTreeMap<String, String> = keys.into_iter().map(|(k, (v, _))| (k, v)).collect();
    if meta.len() > MAX_META {
        return Err(Refused::Meta(format!("{} pairs", meta.len())));
    }
    for (k, v) in &meta {
        let key_ok =
            k.len() <= MAX_META_KEY_LEN && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !key_ok || k.starts_with(RESERVED_META) || v.len() > MAX_META_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(Refused::Meta(k.chars().take(64).collect()));
        }
    }
    Ok(ServiceDef {
        port,
        name,
        id,
        tags,
        meta,
        check,
    })
}

/// A DNS label: 1-63 of `a-z0-9-`, not starting or ending with `-`.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `SERVICE_TAGS` as [`tags`] splits them, each also passing the lb's rules
/// (`haproxy_weight=abc` is refused here rather than ignored there).
pub fn checked_tags(text: &str) -> Result<Vec<String>, Refused> {
    let tags = tags(text)?;
    let (_, warnings) = crate::lb::tags::parse_tags(&tags);
    match warnings.into_iter().next() {
        Some(warning) => Err(Refused::LbTag(warning.chars().take(200).collect())),
        None => Ok(tags),
    }
}

/// `SERVICE_TAGS`: comma-separated, `\,` a comma inside a tag, blanks trimmed,
/// empty ones dropped, duplicates kept once.
fn tags(text: &str) -> Result<Vec<String>, Refused> {
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    let finish = |current: &mut String, out: &mut Vec<String>| -> Result<(), Refused> {
        let tag = current.trim().to_string();
        current.clear();
        if tag.is_empty() || out.contains(&tag) {
            return Ok(());
        }
        if tag.len() > MAX_TAG_LEN || tag.chars().any(char::is_control) {
            return Err(Refused::Tag(tag.chars().take(64).collect()));
        }
        if out.len() == MAX_TAGS {
            return Err(Refused::TooManyTags(text.split(',').count()));
        }
        out.push(tag);
        Ok(())
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(',') => current.push(','),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            ',' => finish(&mut current, &mut out)?,
            c => current.push(c),
        }
    }
    finish(&mut current, &mut out)?;
    Ok(out)
}

/// `SERVICE_CHECK_HTTP` / `SERVICE_CHECK_TCP` with `_INTERVAL` and `_TIMEOUT`
/// (taken out of `keys`, so they are not Meta).
fn check(keys: &mut BTreeMap<String, (String, bool)>) -> Result<Option<Check>, Refused> {
    let http = keys.remove("check_http").map(|(v, _)| v);
    let tcp = keys.remove("check_tcp").map(|(v, _)| v);
    let interval = keys.remove("check_interval").map(|(v, _)| v);
    let timeout = keys.remove("check_timeout").map(|(v, _)| v);
    let time = |text: Option<String>, default: u64, what: &str| -> Result<Duration, Refused> {
        let Some(text) = text else {
            return Ok(Duration::from_secs(default));
        };
        let d = humantime_serde::re::humantime::parse_duration(text.trim())
            .map_err(|e| Refused::Check(format!("{what} `{text}`: {e}")))?;
        if d < CHECK_TIMES.0 || d > CHECK_TIMES.1 {
            return Err(Refused::Check(format!("{what} `{text}`: between 1s and 1h")));
        }
        Ok(d)
    };
    let interval = time(interval, 10, "interval")?;
    let timeout = time(timeout, 5, "timeout")?;
    let probe = match (http, tcp) {
        (Some(path), _) => {
            let path = path.trim().to_string();
            let ok = path.starts_with('/') && path.len() <= 1024 && !path.chars().any(|c| c.is_control() || c == ' ');
            if !ok {
                return Err(Refused::Check(format!(
                    "http path `{}` (a path such as /health)",
                    path.chars().take(64).collect::<String>()
                )));
            }
            Probe::Http(path)
        }
        (None, Some(on)) if crate::config::shared::parse_bool(&on) == Ok(true) => Probe::Tcp,
        _ => return Ok(None),
    };
    Ok(Some(Check {
        probe,
        interval,
        timeout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[&str]) -> Vec<String> {
        pairs.iter().map(|s| s.to_string()).collect()
    }

    fn tcp(p: u16) -> Port {
        Port { private: p, udp: false }
    }

    fn run(image: &str, e: &[&str], labels: &[(&str, &str)], ports: &[Port]) -> Vec<Result<ServiceDef, Refused>> {
        let env = env(e);
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        services(&Container {
            name: "c",
            image,
            env: &env,
            labels: &labels,
            ports,
        })
        .unwrap()
    }

    #[test]
    fn panteras_plain_run_is_the_image_name_with_its_tags() {
        let s = run(
            "registry:5000/team/Python:3.11",
            &["SERVICE_TAGS=haproxy,haproxy_route=/api", "PATH=/bin"],
            &[],
            &[tcp(8080)],
        );
        let d = s[0].as_ref().unwrap();
        assert_eq!(d.name, "python");
        assert_eq!(d.tags, ["haproxy", "haproxy_route=/api"]);
        assert!(d.meta.is_empty() && d.check.is_none() && d.id.is_none());
    }

    #[test]
    fn several_ports_get_their_port_in_the_name_and_port_keys_win() {
        let s = run(
            "app",
            &[
                "SERVICE_NAME=web",
                "SERVICE_9000_NAME=admin",
                "SERVICE_9000_TAGS=internal",
            ],
            &[],
            &[tcp(8080), tcp(9000)],
        );
        assert_eq!(
            s[0].as_ref().unwrap().name,
            "web",
            "a general name applies to every port"
        );
        assert_eq!(s[1].as_ref().unwrap().name, "admin");
        assert_eq!(s[1].as_ref().unwrap().tags, ["internal"]);
        let s = run("app", &[], &[], &[tcp(8080), tcp(9000)]);
        assert_eq!(s[0].as_ref().unwrap().name, "app-8080");
    }

    #[test]
    fn labels_win_over_env_ignore_skips_and_the_rest_is_meta() {
        let s = run(
            "app",
            &["SERVICE_NAME=fromenv", "SERVICE_VERSION=1", "SERVICE_81_IGNORE=yes"],
            &[("SERVICE_NAME", "fromlabel"), ("other", "x")],
            &[tcp(80), tcp(81)],
        );
        assert_eq!(s.len(), 1, "port 81 is ignored");
        let d = s[0].as_ref().unwrap();
        assert_eq!(d.name, "fromlabel");
        assert_eq!(d.meta, BTreeMap::from([("version".to_string(), "1".to_string())]));
    }

    #[test]
    fn tags_split_at_commas_with_escaped_commas_kept() {
        assert_eq!(tags(r"a, b\,c ,,a").unwrap(), ["a", "b,c"]);
        let many = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",");
        assert!(matches!(tags(&many), Err(Refused::TooManyTags(_))));
        assert!(matches!(tags("ok,bad\u{7}"), Err(Refused::Tag(_))));
        assert!(matches!(tags(&"x".repeat(MAX_TAG_LEN + 1)), Err(Refused::Tag(_))));
    }

    #[test]
    fn checks_are_read_and_bounded() {
        let s = run(
            "app",
            &["SERVICE_CHECK_HTTP=/health", "SERVICE_CHECK_INTERVAL=15s"],
            &[],
            &[tcp(80)],
        );
        assert_eq!(
            s[0].as_ref().unwrap().check,
            Some(Check {
                probe: Probe::Http("/health".into()),
                interval: Duration::from_secs(15),
                timeout: Duration::from_secs(5)
            })
        );
        let s = run("app", &["SERVICE_CHECK_TCP=true"], &[], &[tcp(80)]);
        assert!(matches!(
            s[0].as_ref().unwrap().check,
            Some(Check { probe: Probe::Tcp, .. })
        ));
        for bad in [
            "SERVICE_CHECK_INTERVAL=1ms",
            "SERVICE_CHECK_TIMEOUT=forever",
            "SERVICE_CHECK_HTTP=health",
        ] {
            let s = run("app", &["SERVICE_CHECK_HTTP=/h", bad], &[], &[tcp(80)]);
            assert!(matches!(s[0], Err(Refused::Check(_))), "{bad}: {:?}", s[0]);
        }
    }

    #[test]
    fn hostile_input_is_refused_per_port_and_bounded() {
        for name in ["../x", "a.b", "-x", "", &"x".repeat(64), "UPPER ok"] {
            let s = run("app", &[&format!("SERVICE_80_NAME={name}")], &[], &[tcp(80), tcp(81)]);
            assert!(matches!(s[0], Err(Refused::Name(_))), "{name:?}: {:?}", s[0]);
            assert!(s[1].is_ok(), "the other port is not affected");
        }
        let s = run("app", &["SERVICE_ID=other/container"], &[], &[tcp(80)]);
        assert!(matches!(s[0], Err(Refused::Id(_))));
        let s = run("app", &["SERVICE_BAD KEY=1"], &[], &[tcp(80)]);
        assert!(matches!(s[0], Err(Refused::Meta(_))));
        let many: Vec<String> = (0..=MAX_KEYS).map(|i| format!("SERVICE_K{i}=v")).collect();
        let labels = BTreeMap::new();
        let c = Container {
            name: "c",
            image: "app",
            env: &many,
            labels: &labels,
            ports: &[tcp(80)],
        };
        assert!(matches!(services(&c), Err(Refused::TooManyKeys(_))));
        let meta: Vec<String> = (0..=MAX_META).map(|i| format!("SERVICE_K{i}=v")).collect();
        let c = Container { env: &meta, ..c };
        assert!(matches!(services(&c).unwrap()[0], Err(Refused::Meta(_))));
    }
}
