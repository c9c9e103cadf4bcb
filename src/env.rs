//! The PanteraS environment variables, read through one trait.
//!
//! Configuration resolution asks an [`Env`] rather than `std::env`, so tests hand in
//! a map and never mutate the process environment (which would race between
//! parallel tests). [`VARS`] is the one table of every variable Wayfinder reads.
//!
//! `docker run --env-file` and compose's `env_file:` (v1) keep a value's quotes:
//! `HAPROXY_ADD_DOMAIN=".apps.example.com"` arrives with them. No real value of
//! these variables begins and ends with a quote, so [`ProcessEnv`] unwraps one
//! matching pair ([`unquote`]) of every variable of [`VARS`].

use std::collections::HashMap;

/// A source of environment variables.
pub trait Env {
    /// The value of `key`, if set and not empty.
    fn get(&self, key: &str) -> Option<String>;

    /// Where `key`'s value was written, when a file set it (`restricted/host
    /// line 6`), for messages that say which line to change.
    fn origin(&self, _key: &str) -> Option<String> {
        None
    }
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        process_value(key, std::env::var(key).ok()?)
    }
}

/// What [`ProcessEnv`] makes of `key`'s raw value: quotes unwrapped for
/// Wayfinder's own variables, blank as unset. Public for tests that stand in
/// for the process environment.
pub fn process_value(key: &str, raw: String) -> Option<String> {
    let value = if is_panteras(key) {
        unquote(&raw).to_string()
    } else {
        raw
    };
    Some(value).filter(|v| !v.trim().is_empty())
}

/// Whether `key` is one of [`VARS`].
fn is_panteras(key: &str) -> bool {
    VARS.iter().any(|(name, _)| *name == key)
}

/// `value` without one pair of matching surrounding quotes (`"x"` or `'x'`),
/// as an env file that Docker read literally left them; otherwise `value`.
/// Blanks around the quotes (`KEY= "x" `) go too. Only the outer pair: `"'x'"`
/// is `'x'`.
pub fn unquote(value: &str) -> &str {
    let trimmed = value.trim();
    for q in ['"', '\''] {
        if trimmed.len() >= 2 && trimmed.starts_with(q) && trimmed.ends_with(q) {
            return &trimmed[1..trimmed.len() - 1];
        }
    }
    value
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// Bind addresses of every listener (keeps each listener's port): one
/// address, or several separated by commas or spaces.
pub const LISTEN_IP: &str = "LISTEN_IP";
/// This host's address: the default target of wildcard and LB answers.
pub const HOST_IP: &str = "HOST_IP";
/// PanteraS's own name for this host's address (`restricted/host`): sets
/// `HOST_IP` and `CONSUL_IP` unless they are given.
pub const IP: &str = "IP";
/// The docker daemon's address (`tcp://ADDR:PORT`): a guess of the host address.
pub const DOCKER_HOST: &str = "DOCKER_HOST";
/// Consul agent address: HTTP on its configured port (8500), DNS on 8600.
pub const CONSUL_IP: &str = "CONSUL_IP";
/// Consul's DNS domain.
pub const CONSUL_DOMAIN: &str = "CONSUL_DOMAIN";
/// Consul datacenter.
pub const CONSUL_DC: &str = "CONSUL_DC";
/// The wildcard domain answered with the load-balancer hosts.
pub const HAPROXY_ADD_DOMAIN: &str = "HAPROXY_ADD_DOMAIN";

/// How the dns answers A/AAAA for `*.service.<consul domain>`: `consul`
/// (the instances) or `lb` (the LB hosts, as PanteraS's dnsmasq did).
pub const DNS_CONSUL_A_RECORDS: &str = "DNS_CONSUL_A_RECORDS";

/// Serve HTTPS from the lb (`true`/`false`).
pub const HAPROXY_SSL: &str = "HAPROXY_SSL";

/// Host role: a master runs the Consul agent in server mode (default `true`).
pub const MASTER: &str = "MASTER";
/// Host role: a slave runs the lb (default `true`).
pub const SLAVE: &str = "SLAVE";
/// Override: start the dns component (`true`/`false`).
pub const START_DNS: &str = "START_DNS";
/// Override: start the lb component.
pub const START_LB: &str = "START_LB";
/// Override: start the vpn component.
pub const START_VPN: &str = "START_VPN";
/// Override: start the register component (PanteraS's registrator).
pub const START_REGISTRATOR: &str = "START_REGISTRATOR";
/// Override: start the built-in Consul agent.
pub const START_CONSUL: &str = "START_CONSUL";
/// PanteraS alias of [`START_DNS`] (dnsmasq was its DNS server).
pub const START_DNSMASQ: &str = "START_DNSMASQ";
/// PanteraS alias of [`START_LB`] (consul-template fed its HAProxy).
pub const START_CONSUL_TEMPLATE: &str = "START_CONSUL_TEMPLATE";
/// Consul join arguments, PanteraS style: `-join=master-1 -join=master-2`.
pub const CONSUL_HOSTS: &str = "CONSUL_HOSTS";
/// Extra Consul agent arguments, e.g. `-bootstrap-expect 3`.
pub const CONSUL_PARAMS: &str = "CONSUL_PARAMS";
/// Bearer token of the admin endpoint (overrides `supervisor.token`).
pub const WAYFINDER_ADMIN_TOKEN: &str = "WAYFINDER_ADMIN_TOKEN";

/// Every variable Wayfinder reads, with what it overrides (printed by `check`).
pub const VARS: &[(&str, &str)] = &[
    (
        LISTEN_IP,
        "the addresses of the listeners (ports kept), one or several separated by commas or spaces: dns.listen on each; lb.http and lb.https on the first, lb.also_listen the others; lb.stats and vpn.listen on the first. The docker bridge (docker0) is added to the dns and lb when it exists",
    ),
    (
        HOST_IP,
        "dns.wildcard_targets when none are configured; a landing-page host of the lb; the vpn client endpoint when vpn.endpoint is unset",
    ),
    (
        IP,
        "PanteraS's host address: HOST_IP and CONSUL_IP unless given; without HOST_IP and IP the address is guessed (host name, DOCKER_HOST, first private interface address)",
    ),
    (
        DOCKER_HOST,
        "register.docker; a guess of the host address when HOST_IP and IP are unset",
    ),
    (CONSUL_IP, "consul.http and consul.dns addresses (ports kept)"),
    (CONSUL_DOMAIN, "consul.domain"),
    (CONSUL_DC, "consul.datacenter"),
    (HAPROXY_ADD_DOMAIN, "dns.wildcard_domain"),
    (
        DNS_CONSUL_A_RECORDS,
        "dns.consul_a_records: `lb` answers A/AAAA of NAME.service.consul with the LB hosts (PanteraS), `consul` with the instances",
    ),
    (HAPROXY_SSL, "lb.ssl"),
    (MASTER, "up: host role; a master runs Consul as a server (default true)"),
    (
        SLAVE,
        "up: host role; a slave runs the lb and the register component (default true)",
    ),
    (START_DNS, "up: start the dns component (default: every host)"),
    (START_LB, "up: start the lb component (default: SLAVE)"),
    (
        START_VPN,
        "vpn.enabled: up starts the vpn, the dns answers on the tunnel address (default: off)",
    ),
    (
        START_CONSUL,
        "up: start the built-in Consul agent (supervisor.consul.enabled)",
    ),
    (START_REGISTRATOR, "up: start the register component (default: SLAVE)"),
    (START_DNSMASQ, "up: alias of START_DNS"),
    (START_CONSUL_TEMPLATE, "up: alias of START_LB"),
    (CONSUL_HOSTS, "up: Consul join arguments (-join=HOST ..., retried)"),
    (
        CONSUL_PARAMS,
        "up: extra Consul agent arguments (-bootstrap-expect 3 ...)",
    ),
    (WAYFINDER_ADMIN_TOKEN, "supervisor.token"),
];

/// The PanteraS variables as `generate_yml.sh` derived them: `HOST_IP` is the
/// host address (given or guessed, see [`crate::net::host`]) and `CONSUL_IP`
/// falls back to `IP`.
pub struct Panteras<'a> {
    base: &'a dyn Env,
    host_ip: Option<String>,
}

impl<'a> Panteras<'a> {
    /// `base` with `host_ip` as its `HOST_IP`.
    pub fn new(base: &'a dyn Env, host_ip: Option<std::net::IpAddr>) -> Self {
        Self {
            base,
            host_ip: host_ip.map(|ip| ip.to_string()),
        }
    }
}

impl Env for Panteras<'_> {
    fn get(&self, key: &str) -> Option<String> {
        match key {
            HOST_IP => self.host_ip.clone(),
            CONSUL_IP => self.base.get(CONSUL_IP).or_else(|| self.base.get(IP)),
            _ => self.base.get(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_of_matching_quotes_is_unwrapped() {
        for (raw, want) in [
            ("\".apps.example.com\"", ".apps.example.com"),
            ("'.apps.example.com'", ".apps.example.com"),
            ("\"-join=10.0.0.1 -join=10.0.0.2\"", "-join=10.0.0.1 -join=10.0.0.2"),
            (" \"10.0.0.1\" ", "10.0.0.1"),
            ("\"'x'\"", "'x'"),
            ("\"\"", ""),
            // Not a matching pair: left as it is.
            ("\"", "\""),
            ("\"x'", "\"x'"),
            ("\"x", "\"x"),
            ("x\"", "x\""),
            ("10.0.0.1", "10.0.0.1"),
            ("-retry-join=\"a\" -x", "-retry-join=\"a\" -x"),
        ] {
            assert_eq!(unquote(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn the_process_environment_unwraps_wayfinders_variables() {
        let read = |k: &str, v: &str| process_value(k, v.to_string());
        for (key, _) in VARS {
            assert_eq!(read(key, "\"v\"").as_deref(), Some("v"), "{key}");
        }
        assert_eq!(
            read(HAPROXY_ADD_DOMAIN, "\".apps.example.com\"").as_deref(),
            Some(".apps.example.com")
        );
        assert_eq!(read(LISTEN_IP, "''"), None, "quoted empty is unset");
        assert_eq!(read(LISTEN_IP, "  "), None);
        // Not one of Wayfinder's variables: read as it is.
        assert_eq!(read("PATH", "\"/bin\"").as_deref(), Some("\"/bin\""));
    }
}
