//! What `consul agent` 1.8 accepts on its command line, for the words of
//! `CONSUL_HOSTS` and `CONSUL_PARAMS`: split as supervisord split PanteraS's
//! command line, and checked flag by flag so that `check` and `up` refuse
//! (exit 64, naming the variable) what Consul would refuse at start.
//!
//! ```text
//!  CONSUL_HOSTS / CONSUL_PARAMS value ──agent_words──▶ words (roles::plan, consul::program)
//! ```
//!
//! A leaf: the planner (`roles`) and the agent's command line (`consul`) both
//! read it.

use std::net::IpAddr;

use crate::config::shared::ConfigError;

/// What a flag of `consul agent` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takes {
    /// Nothing: `-ui` (or `-ui=true`).
    Nothing,
    /// Any non-empty value.
    Value,
    /// A host name or address, optionally with a port (or a go-discover
    /// `provider=...` for the retry joins).
    Host,
    /// A whole number.
    Number,
    /// A Go duration: `30s`, `1m30s`.
    Duration,
}

/// The flags of `consul agent` (1.8.7, `consul agent -h`).
pub(super) const AGENT_FLAGS: &[(&str, Takes)] = &[
    ("advertise", Takes::Value),
    ("advertise-wan", Takes::Value),
    ("allow-write-http-from", Takes::Value),
    ("alt-domain", Takes::Value),
    ("bind", Takes::Value),
    ("bootstrap", Takes::Nothing),
    ("bootstrap-expect", Takes::Number),
    ("check_output_max_size", Takes::Number),
    ("client", Takes::Value),
    ("config-dir", Takes::Value),
    ("config-file", Takes::Value),
    ("config-format", Takes::Value),
    ("data-dir", Takes::Value),
    ("datacenter", Takes::Value),
    ("default-query-time", Takes::Duration),
    ("dev", Takes::Nothing),
    ("disable-host-node-id", Takes::Nothing),
    ("disable-keyring-file", Takes::Nothing),
    ("dns-port", Takes::Number),
    ("domain", Takes::Value),
    ("enable-local-script-checks", Takes::Nothing),
    ("enable-script-checks", Takes::Nothing),
    ("encrypt", Takes::Value),
    ("grpc-port", Takes::Number),
    ("hcl", Takes::Value),
    ("http-port", Takes::Number),
    ("https-port", Takes::Number),
    ("join", Takes::Host),
    ("join-wan", Takes::Host),
    ("log-file", Takes::Value),
    ("log-json", Takes::Nothing),
    ("log-level", Takes::Value),
    ("log-rotate-bytes", Takes::Number),
    ("log-rotate-duration", Takes::Duration),
    ("log-rotate-max-files", Takes::Number),
    ("max-query-time", Takes::Duration),
    ("node", Takes::Value),
    ("node-id", Takes::Value),
    ("node-meta", Takes::Value),
    ("non-voting-server", Takes::Nothing),
    ("pid-file", Takes::Value),
    ("primary-gateway", Takes::Host),
    ("protocol", Takes::Number),
    ("raft-protocol", Takes::Number),
    ("recursor", Takes::Host),
    ("rejoin", Takes::Nothing),
    ("retry-interval", Takes::Duration),
    ("retry-interval-wan", Takes::Duration),
    ("retry-join", Takes::Host),
    ("retry-join-wan", Takes::Host),
    ("retry-max", Takes::Number),
    ("retry-max-wan", Takes::Number),
    ("segment", Takes::Value),
    ("serf-lan-allowed-cidrs", Takes::Value),
    ("serf-lan-bind", Takes::Value),
    ("serf-lan-port", Takes::Number),
    ("serf-wan-allowed-cidrs", Takes::Value),
    ("serf-wan-bind", Takes::Value),
    ("serf-wan-port", Takes::Number),
    ("server", Takes::Nothing),
    ("server-port", Takes::Number),
    ("syslog", Takes::Nothing),
    ("ui", Takes::Nothing),
    ("ui-content-path", Takes::Value),
    ("ui-dir", Takes::Value),
];

/// `value` split into words as supervisord split PanteraS's command line
/// (`consul agent ... $CONSUL_PARAMS`): at blanks, with `'...'` and `"..."`
/// grouping (and removed) and `\` escaping one character.
fn split_words(value: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some(x) if x == c => break,
                        Some('\\') if c == '"' => w.extend(chars.next()),
                        Some(x) => w.push(x),
                        None => return Err(format!("a {c} quote is not closed")),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c if c.is_whitespace() => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Whether `text` is a host name, an IP address, either with a `:port`, or a
/// bracketed IPv6 address with one.
fn is_host(text: &str) -> bool {
    if text.parse::<IpAddr>().is_ok() || text.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let name = match text.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        _ => text,
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label)
}

/// Whether `text` is a Go duration (`30s`, `1m30s`, `500ms`).
fn is_duration(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len())
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// Why `value` is not what `flag` takes, if it is not.
fn bad_value(flag: &str, takes: Takes, value: &str) -> Option<String> {
    let ok = match takes {
        Takes::Nothing => matches!(value, "true" | "false" | "1" | "0"),
        Takes::Value => !value.trim().is_empty(),
        Takes::Host => is_host(value) || (flag.starts_with("retry-join") && value.starts_with("provider=")),
        Takes::Number => value.parse::<u64>().is_ok(),
        Takes::Duration => is_duration(value),
    };
    if ok {
        return None;
    }
    let what = match takes {
        Takes::Nothing => "nothing, or true/false",
        Takes::Value => "a value",
        Takes::Host => "a host name or address (optionally :port)",
        Takes::Number => "a whole number",
        Takes::Duration => "a duration such as 30s",
    };
    Some(if value.is_empty() {
        format!("-{flag} is empty: it takes {what}")
    } else {
        format!("-{flag} takes {what}, not `{value}`")
    })
}

/// `CONSUL_HOSTS` or `CONSUL_PARAMS` (named `var`) as agent arguments, checked
/// as `consul agent` 1.8 would: every flag one it knows with a value of the
/// right kind. `CONSUL_HOSTS` may also hold bare host names (each a join).
/// A problem is a configuration error naming the variable, so a word Consul
/// would refuse stops `check` and `up` (exit 64) instead of a Consul unit that
/// crash-loops into `failed`.
pub fn agent_words(var: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let error = |problem: String| ConfigError {
        file: "environment".into(),
        key: var.into(),
        problem,
    };
    let words = split_words(value).map_err(|p| error(format!("{p} in `{value}`")))?;
    let hosts = var == crate::env::CONSUL_HOSTS;
    let mut iter = words.iter().peekable();
    while let Some(word) = iter.next() {
        let Some(flag) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
            if hosts {
                if !is_host(word) {
                    return Err(error(format!("`{word}` is neither a flag nor a host name or address")));
                }
                continue;
            }
            return Err(error(format!(
                "`{word}` is not a flag (-name or -name=value) nor the value of one"
            )));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        let Some(&(_, takes)) = AGENT_FLAGS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<String> = AGENT_FLAGS.iter().map(|(n, _)| format!("-{n}")).collect();
            return Err(error(format!(
                "`{word}` is not a flag of consul agent (1.8); it knows {}",
                known.join(" ")
            )));
        };
        let value = match (inline, takes) {
            (Some(v), _) => v.to_string(),
            (None, Takes::Nothing) => continue,
            (None, _) => match iter.next() {
                Some(v) => v.clone(),
                None => return Err(error(format!("-{name} is missing its value"))),
            },
        };
        if let Some(problem) = bad_value(name, takes, &value) {
            return Err(error(problem));
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_words_accept_what_consul_takes() {
        for (var, value) in [
            ("CONSUL_HOSTS", "-join=10.0.0.11 -join=10.0.0.12"),
            (
                "CONSUL_HOSTS",
                "--join=master-1.example.com -join master-2 master-3:8301",
            ),
            ("CONSUL_HOSTS", "-retry-join=[fd00::1]:8301 -retry-join=fd00::2"),
            ("CONSUL_HOSTS", "-retry-join 'provider=aws tag_key=consul tag_value=x'"),
            ("CONSUL_PARAMS", "-bootstrap-expect 3"),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expect=3 -ui -server=true -retry-interval 30s",
            ),
            (
                "CONSUL_PARAMS",
                "-advertise 10.0.0.5 -encrypt=pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=",
            ),
            (
                "CONSUL_PARAMS",
                "-recursor 8.8.8.8 -recursor=1.1.1.1:53 -serf-lan-port 18301",
            ),
            (
                "CONSUL_PARAMS",
                "-bind '{{ GetInterfaceIP \"eth0\" }}' -log-rotate-duration 1h30m",
            ),
            ("CONSUL_PARAMS", ""),
        ] {
            agent_words(var, value).unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }

    #[test]
    fn agent_words_reject_what_consul_would_naming_the_variable() {
        for (var, value, needle) in [
            ("CONSUL_HOSTS", "\"-join=10.0.0.1 -join=10.0.0.2", "quote is not closed"),
            ("CONSUL_PARAMS", "-bootstrap-expect '3", "quote is not closed"),
            ("CONSUL_HOSTS", "-join=", "-join is empty"),
            ("CONSUL_HOSTS", "-join=10.0.0.1 -join", "-join is missing its value"),
            ("CONSUL_HOSTS", "-join=\"10.0.0.1", "quote is not closed"),
            ("CONSUL_HOSTS", "-join=m1 m2!", "`m2!` is neither a flag nor a host"),
            ("CONSUL_HOSTS", "-join=host_name", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "-join=bad..name", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "-join=-x", "-join takes a host name or address"),
            ("CONSUL_HOSTS", "10.0.0.1,10.0.0.2", "neither a flag nor a host"),
            (
                "CONSUL_PARAMS",
                "bootstrap-expect 3",
                "`bootstrap-expect` is not a flag",
            ),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expct 3",
                "`-bootstrap-expct` is not a flag of consul agent",
            ),
            (
                "CONSUL_PARAMS",
                "-bootstrap-expect three",
                "-bootstrap-expect takes a whole number",
            ),
            (
                "CONSUL_PARAMS",
                "-retry-interval 30",
                "-retry-interval takes a duration",
            ),
            ("CONSUL_PARAMS", "-ui yes", "`yes` is not a flag"),
            ("CONSUL_PARAMS", "-ui=yes", "-ui takes nothing"),
            ("CONSUL_PARAMS", "-recursor=dns!", "-recursor takes a host"),
        ] {
            let e = agent_words(var, value).expect_err(value);
            assert_eq!(e.key, var);
            assert!(e.problem.contains(needle), "{var}={value}: {e}");
        }
        let e = agent_words("CONSUL_PARAMS", "-bootstrap-expct 3").unwrap_err();
        for known in [
            "-bootstrap-expect",
            "-retry-join",
            "-advertise",
            "-encrypt",
            "-ui",
            "-serf-lan-port",
        ] {
            assert!(e.problem.contains(known), "the known flags are listed: {e}");
        }
    }
}
