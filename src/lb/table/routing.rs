//! The routing table and its lookups: where an HTTP request goes
//! ([`RoutingTable::route`] ─▶ [`Destination`]), the TCP ports to listen on,
//! and what the status page lists.
//!
//! ```text
//!  route(Host, path):
//!    hosts[host] ─longest(path)─▶ Backend
//!    svc.service.<dc>.<domain> ──▶ OtherDatacenter(local backend)
//!    paths.longest(path) ──▶ Backend;  landing host ──▶ Landing;  else NotFound
//! ```
//!
//! Made by the full build (`compile.rs`) or a delta (`delta.rs`), which write it
//! through [`RoutingTable::put`]; never changed once published.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use super::backend::Backend;
use super::claims::{Key, Part, SpecKey};
use super::prefixes::{HostRoutes, PrefixMap};
use super::spec::{Naming, TableConfig};
use crate::lb::policy::{Refused, is_service_name};
use crate::lb::tags;

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// Proxy to this backend (`pick` may still find no instance: then 503).
    Backend(&'a Arc<Backend>),
    /// `svc.service.<dc>.<domain>` for a datacenter the table has no instances
    /// for: the local backend of that service (or a path route), as PanteraS
    /// always did, while the caller asks the watcher to follow that datacenter.
    OtherDatacenter(Option<&'a Arc<Backend>>),
    /// The landing/status page.
    Landing,
    /// Nobody answers to this Host and path.
    NotFound,
}

/// Immutable once published; swapped atomically by the watcher (arc-swap), so
/// it must be Send + Sync. Its maps are persistent (`imbl`): cloning a table is
/// O(1), and the next table, made by [`TableState`] from a delta, shares every
/// entry the delta did not touch.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    /// Lower-case host name to its prefixes.
    pub(super) hosts: imbl::HashMap<Arc<str>, HostRoutes>,
    /// Host-independent path prefixes.
    pub(super) paths: PrefixMap,
    /// Local HTTP backends by lower-case service name, for `svc.service.<dc>.<domain>`
    /// when there is no spec for that datacenter.
    pub(super) local: imbl::HashMap<Arc<str>, Arc<Backend>>,
    /// `.<domain>` (empty when the domain is).
    pub(super) domain_suffix: Arc<str>,
    /// Lower-case landing host names and addresses.
    pub(super) landing: Arc<HashSet<String>>,
    /// TCP port to backend.
    pub(super) tcp: imbl::OrdMap<u16, Arc<Backend>>,
    /// Every HTTP backend, by service name then datacenter.
    pub(super) backends: imbl::OrdMap<SpecKey, Arc<Backend>>,
    /// The parts with something the policy left out, by service name then datacenter.
    pub(super) refused: imbl::OrdMap<SpecKey, Arc<Part>>,
}

impl RoutingTable {
    /// A table that routes nothing but the landing page (before Consul answers).
    pub fn empty(cfg: &TableConfig) -> Self {
        let names = Naming::new(cfg);
        let landing = cfg
            .landing_hosts
            .iter()
            .map(|h| tags::bare_host(h).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Self {
            hosts: imbl::HashMap::new(),
            paths: PrefixMap::default(),
            local: imbl::HashMap::new(),
            domain_suffix: if names.domain.is_empty() {
                "".into()
            } else {
                format!(".{}", names.domain).into()
            },
            landing: Arc::new(landing),
            tcp: imbl::OrdMap::new(),
            backends: imbl::OrdMap::new(),
            refused: imbl::OrdMap::new(),
        }
    }
    /// Routing decision for an HTTP request: `host` is the raw Host header (may carry
    /// :port, trailing dot, any case) or None; `path` is the request path (no query).
    pub fn route(&self, host: Option<&str>, path: &str) -> Destination<'_> {
        let host = host.map(tags::bare_host).filter(|h| !h.is_empty()).map(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(h.to_ascii_lowercase())
            } else {
                Cow::Borrowed(h)
            }
        });
        let host = host.as_deref();
        match host.map(|h| self.host_backend(h, path)) {
            Some(HostMatch::Found(backend)) => return Destination::Backend(backend),
            Some(HostMatch::OtherDatacenter(local)) => {
                return Destination::OtherDatacenter(local.or_else(|| self.paths.longest(path)));
            }
            Some(HostMatch::None) | None => {}
        }
        if let Some(backend) = self.paths.longest(path) {
            return Destination::Backend(backend);
        }
        if host.is_some_and(|h| self.landing.contains(h)) {
            return Destination::Landing;
        }
        Destination::NotFound
    }

    /// TCP listeners wanted: port -> backend (haproxy_tcp), by port.
    pub fn tcp_ports(&self) -> impl Iterator<Item = (u16, &Arc<Backend>)> {
        self.tcp.iter().map(|(port, backend)| (*port, backend))
    }

    /// Every HTTP backend (for the status page and health checks), by service name
    /// then datacenter.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.values()
    }

    /// The services, instances and ports the policy refused (by service name then
    /// datacenter), for status pages.
    pub fn refused(&self) -> impl Iterator<Item = &Refused> {
        self.refused.values().flat_map(|part| part.refused.iter())
    }

    /// Every routing entry: (host, path prefix, backend); host `None` for the
    /// host-independent path routes. Sorted by host then path; for status pages.
    pub fn entries(&self) -> Vec<(Option<&str>, &str, &Arc<Backend>)> {
        let mut all: Vec<_> = self
            .hosts
            .iter()
            .flat_map(|(h, routes)| -> Box<dyn Iterator<Item = _>> {
                match routes {
                    HostRoutes::Root(b) => Box::new(std::iter::once((Some(&**h), "/", b))),
                    HostRoutes::Prefixes(map) => Box::new(map.iter().map(move |(p, b)| (Some(&**h), p, b))),
                }
            })
            .chain(self.paths.iter().map(|(p, b)| (None, p, b)))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }

    /// What a lower-case host name asks for.
    fn host_backend(&self, host: &str, path: &str) -> HostMatch<'_> {
        if let Some(backend) = self.hosts.get(host).and_then(|routes| routes.longest(path)) {
            return HostMatch::Found(backend);
        }
        // `svc.service.<dc>.<domain>` for a datacenter we have no instances of.
        match other_datacenter_name(host, &self.domain_suffix) {
            Some((name, _)) => HostMatch::OtherDatacenter(self.local.get(name)),
            None => HostMatch::None,
        }
    }

    /// Puts `winner` at `key` (or takes the key out): the delta's one write.
    pub(super) fn put(&mut self, key: &Key, winner: Option<Arc<Backend>>) {
        match key {
            Key::Host(host, path) => {
                let routes = match (self.hosts.get(&**host), &**path, winner) {
                    (None | Some(HostRoutes::Root(_)), "/", Some(b)) => Some(HostRoutes::Root(b)),
                    (None | Some(HostRoutes::Root(_)), "/", None) => None,
                    (current, _, winner) => {
                        let mut map = current.map(HostRoutes::to_map).unwrap_or_default();
                        map.set(path, winner);
                        HostRoutes::of(map)
                    }
                };
                match routes {
                    Some(r) => self.hosts.insert(host.clone(), r),
                    None => self.hosts.remove(&**host),
                };
            }
            Key::Path(path) => self.paths.set(path, winner),
            Key::Local(name) => {
                match winner {
                    Some(b) => self.local.insert(name.clone(), b),
                    None => self.local.remove(&**name),
                };
            }
            Key::Tcp(port) => {
                match winner {
                    Some(b) => self.tcp.insert(*port, b),
                    None => self.tcp.remove(port),
                };
            }
        }
    }

    /// Every routing decision of the table as text, in a fixed order: two
    /// tables route alike exactly when these are equal (what the delta is
    /// checked against, see [`TableState::check`]).
    pub(super) fn describe(&self) -> Vec<String> {
        fn b(backend: &Backend) -> String {
            let instances: Vec<String> = backend
                .instances
                .iter()
                .map(|i| format!("{}/{}/{}/{}/{:?}", i.id, i.node, i.addr, i.weight, i.httpchk))
                .collect();
            format!("{}@{} [{}]", backend.service, backend.datacenter, instances.join(" "))
        }
        fn lens_ok(map: &PrefixMap) -> bool {
            let mut want: Vec<(usize, u32)> = Vec::new();
            let mut lens: Vec<usize> = map.by_prefix.keys().map(|k| k.len()).collect();
            lens.sort_unstable_by(|a, b| b.cmp(a));
            for len in lens {
                match want.last_mut() {
                    Some((l, n)) if *l == len => *n += 1,
                    _ => want.push((len, 1)),
                }
            }
            want == map.lens
        }
        let mut out: Vec<String> = self
            .entries()
            .into_iter()
            .map(|(h, p, backend)| format!("route {} {p} -> {}", h.unwrap_or("*"), b(backend)))
            .collect();
        for (host, routes) in &self.hosts {
            if let HostRoutes::Prefixes(map) = routes
                && (!lens_ok(map) || map.by_prefix.is_empty())
            {
                out.push(format!("host {host}: prefix lengths out of step"));
            }
        }
        if !lens_ok(&self.paths) {
            out.push("paths: prefix lengths out of step".into());
        }
        let mut local: Vec<String> = self
            .local
            .iter()
            .map(|(n, backend)| format!("local {n} -> {}", b(backend)))
            .collect();
        local.sort();
        out.extend(local);
        out.extend(self.tcp.iter().map(|(p, backend)| format!("tcp {p} -> {}", b(backend))));
        out.extend(self.backends().map(|backend| format!("backend {}", b(backend))));
        out.extend(self.refused().map(|r| format!("refused {r:?}")));
        out.push(format!("domain {:?} landing {:?}", self.domain_suffix, {
            let mut l: Vec<&String> = self.landing.iter().collect();
            l.sort();
            l
        }));
        out
    }
}

/// What a host name matched in [`RoutingTable::host_backend`].
enum HostMatch<'a> {
    Found(&'a Arc<Backend>),
    OtherDatacenter(Option<&'a Arc<Backend>>),
    None,
}

/// `(service, dc)` of a lower-case `svc.service.<dc>.<domain>` name;
/// `domain_suffix` is `.<domain>` (or empty).
pub fn other_datacenter_name<'h>(host: &'h str, domain_suffix: &str) -> Option<(&'h str, &'h str)> {
    let rest = host.strip_suffix(domain_suffix)?;
    let (service, dc) = rest.rsplit_once('.')?;
    let name = service.strip_suffix(".service")?;
    // Both go into Consul queries: names only, nothing a Host header can bend.
    (is_service_name(name) && is_service_name(dc)).then_some((name, dc))
}
