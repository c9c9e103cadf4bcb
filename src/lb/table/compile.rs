//! The full build of a table from nothing, and the compilation of one
//! [`ServiceSpec`] into the [`Part`] it asks for (also used by the delta).
//!
//! ```text
//!  ServiceSpec ──compile (policy, naming)──▶ Part (backends, claims, refusals)
//!  Parts in SpecKey order ──Builder::assemble──▶ RoutingTable + warnings
//!                                           └──▶ Claims (kept by the delta)
//! ```
//!
//! Conflicts go to the service whose name sorts first and are reported as
//! warnings, so the outcome never depends on the order Consul answered in.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::backend::{Backend, BackendInstance};
use super::carryover::Carryover;
use super::claims::{Claim, Claimants, Claims, Key, Part, SpecKey, lower};
use super::prefixes::{HostRoutes, PrefixMap};
use super::routing::RoutingTable;
use super::spec::{InstanceSpec, Naming, ServiceSpec, TableConfig};
use crate::lb::policy::{BackendPolicy, RefusalReason, Refused, is_service_name};
use crate::lb::tags::InstanceTags;

impl RoutingTable {
    /// Builds from the watcher's view; returns warnings (conflicts such as two
    /// services claiming the same haproxy_route or tcp port: the alphabetically first
    /// service wins, deterministic, logged).
    ///
    /// Only specs of the local datacenter contribute path routes, Fabio prefixes, the
    /// add-domain name and TCP ports; another datacenter's spec only answers to
    /// `svc.service.<dc>.<domain>`. A service gets an HTTP backend when at least one
    /// instance takes HTTP; its routes are the union over its instances.
    ///
    /// This is the full build, from nothing; [`TableState`] keeps a table up to
    /// date by delta, and builds it this way only when it must.
    pub fn build(cfg: &TableConfig, services: &[ServiceSpec], health: &Carryover) -> (Self, Vec<String>) {
        let names = Naming::new(cfg);
        let listeners = tcp_listeners(cfg, services.iter());
        let mut order: Vec<&ServiceSpec> = services.iter().collect();
        // Stable: equal keys keep the caller's order, which only the duplicate check
        // sees. Compared without allocating.
        order.sort_by(|a, b| {
            lower(&a.name)
                .cmp(lower(&b.name))
                .then_with(|| a.name.cmp(&b.name))
                .then_with(|| lower(&a.datacenter).cmp(lower(&b.datacenter)))
        });
        let mut builder = Builder::new(cfg, None);
        let mut previous: Option<&ServiceSpec> = None;
        for spec in order {
            // Sorted: a duplicate follows its first list.
            let twice = previous.is_some_and(|p| same_group(p, spec));
            previous = Some(spec);
            if twice {
                builder.warnings.push(listed_twice(spec));
                continue;
            }
            let part = Arc::new(compile(spec, &names, &cfg.policy, &listeners, health));
            builder.assemble(&SpecKey::of(spec), &part);
        }
        (builder.table, builder.warnings)
    }
}

/// The ports the `haproxy_tcp` listeners take: asked for by a local service
/// with a usable name, and allowed by the policy.
fn tcp_listeners<'s>(cfg: &TableConfig, services: impl Iterator<Item = &'s ServiceSpec>) -> BTreeSet<u16> {
    services.flat_map(|s| listener_ports(cfg, s)).collect()
}

/// The `haproxy_tcp` listener ports one spec asks for (once per instance).
pub(super) fn listener_ports<'a>(cfg: &'a TableConfig, spec: &'a ServiceSpec) -> impl Iterator<Item = u16> + 'a {
    let local = cfg.local_datacenter.trim().trim_matches('.');
    let wanted = spec.datacenter.eq_ignore_ascii_case(local) && is_service_name(&spec.name);
    spec.instances
        .iter()
        .filter(move |_| wanted)
        .filter_map(|i| i.tags.tcp_port)
        .filter(|&port| cfg.policy.refuse_tcp_port(port).is_none())
}

/// True when `b` lists the same service and datacenter as `a` (the datacenter
/// in another case): the table uses the first list.
pub(super) fn same_group(a: &ServiceSpec, b: &ServiceSpec) -> bool {
    a.name == b.name && a.datacenter.eq_ignore_ascii_case(&b.datacenter)
}

/// The warning for a spec that [`same_group`] a spec before it.
pub(super) fn listed_twice(spec: &ServiceSpec) -> String {
    format!(
        "service '{}' ({}) is listed twice; using the first list",
        spec.name, spec.datacenter
    )
}

/// Joins the non-empty labels with dots (an empty domain must not leave `svc.service.`).
fn dotted(labels: &[&str]) -> String {
    labels
        .iter()
        .filter(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(".")
}

/// How a backend is named in warnings.
fn label(backend: &Backend) -> String {
    format!("'{}' ({})", backend.service, backend.datacenter)
}

/// A table under construction from nothing, and what went wrong so far.
pub(super) struct Builder<'c> {
    pub(super) table: RoutingTable,
    pub(super) warnings: Vec<String>,
    /// The claimants of each key, when the caller keeps them for deltas.
    pub(super) claims: Option<&'c mut Claims>,
}

impl<'c> Builder<'c> {
    pub(super) fn new(cfg: &TableConfig, claims: Option<&'c mut Claims>) -> Self {
        Self {
            table: RoutingTable::empty(cfg),
            warnings: Vec::new(),
            claims,
        }
    }

    /// Makes the claims of `part` (earlier, alphabetically first, services win).
    /// Parts come in [`SpecKey`] order.
    pub(super) fn assemble(&mut self, key: &SpecKey, part: &Arc<Part>) {
        self.warnings.extend(part.warnings());
        if !part.refused.is_empty() {
            self.table.refused.insert(key.clone(), part.clone());
        }
        if let Some(backend) = &part.http {
            self.table.backends.insert(key.clone(), backend.clone());
            if let Some(name) = &part.local_name {
                self.table.local.entry(name.clone()).or_insert_with(|| backend.clone());
            }
            for claim in &part.claims {
                match claim {
                    Claim::Host(host, path) => self.claim_host(host, path, backend),
                    Claim::Path(path, what) => {
                        if let Err(owner) = self.table.paths.claim(path, backend) {
                            self.warnings.push(conflict(what, &owner, backend));
                        }
                    }
                }
            }
        }
        if let Some((backend, ports)) = &part.tcp {
            for &port in ports {
                match self.table.tcp.get(&port) {
                    Some(owner) => {
                        let warning = conflict(&format!("haproxy_tcp port {port}"), owner, backend);
                        self.warnings.push(warning);
                    }
                    None => {
                        self.table.tcp.insert(port, backend.clone());
                    }
                }
            }
        }
        if let Some(claims) = self.claims.as_deref_mut() {
            for k in part.keys() {
                let claimant = (key.clone(), part.clone());
                match claims.entry(k) {
                    std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().insert(claimant),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Claimants::One(claimant));
                    }
                }
            }
        }
    }

    fn claim_host(&mut self, host: &Arc<str>, path: &Arc<str>, backend: &Arc<Backend>) {
        let root = &**path == "/";
        let owner = match self.table.hosts.entry(host.clone()) {
            // The common case (a service's own names) stays inline, one lookup.
            imbl::hashmap::Entry::Vacant(e) if root => {
                e.insert(HostRoutes::Root(backend.clone()));
                return;
            }
            imbl::hashmap::Entry::Occupied(e) if root && matches!(e.get(), HostRoutes::Root(_)) => match e.get() {
                HostRoutes::Root(owner) => owner.clone(),
                // Not reached: the guard matched Root.
                HostRoutes::Prefixes(_) => return,
            },
            entry => {
                let mut map = match &entry {
                    imbl::hashmap::Entry::Occupied(e) => e.get().to_map(),
                    imbl::hashmap::Entry::Vacant(_) => PrefixMap::default(),
                };
                let claimed = map.claim(path, backend);
                if let Some(routes) = HostRoutes::of(map) {
                    match entry {
                        imbl::hashmap::Entry::Occupied(mut e) => {
                            e.insert(routes);
                        }
                        imbl::hashmap::Entry::Vacant(e) => {
                            e.insert(routes);
                        }
                    }
                }
                match claimed {
                    Ok(()) => return,
                    Err(owner) => owner,
                }
            }
        };
        if Arc::ptr_eq(&owner, backend) {
            return;
        }
        let what = if root {
            format!("host {host}")
        } else {
            format!("host {host} path {path}")
        };
        self.warnings.push(conflict(&what, &owner, backend));
    }
}

/// The conflict warnings of one key: each claim of each claimant after the
/// first one lost to it.
pub(super) fn key_warnings(key: &Key, claimants: Option<&Claimants>) -> Vec<String> {
    let Some([(_, first), rest @ ..]) = claimants.map(Claimants::as_slice) else {
        return Vec::new();
    };
    let Some(winner) = first.backend_for(key) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, part) in rest {
        if let Some(loser) = part.backend_for(key) {
            out.extend(part.claim_names(key).iter().map(|what| conflict(what, winner, loser)));
        }
    }
    out
}

/// What `spec` asks of the table: its backends and the names they claim, less
/// what the policy refuses.
pub(super) fn compile(
    spec: &ServiceSpec,
    names: &Naming,
    policy: &BackendPolicy,
    tcp_listeners: &BTreeSet<u16>,
    health: &Carryover,
) -> Part {
    let name = spec.name.to_ascii_lowercase();
    let dc = spec.datacenter.to_ascii_lowercase();
    let local = dc == names.local_dc;
    let mut part = Part::default();
    let refused = |instance: Option<&InstanceSpec>, port: Option<u16>, reason: RefusalReason| Refused {
        service: spec.name.clone(),
        datacenter: spec.datacenter.clone(),
        instance: instance.map(|i| i.id.clone()),
        addr: instance.map(|i| i.addr),
        port,
        reason,
    };
    if !is_service_name(&spec.name) {
        part.refused.push(refused(None, None, RefusalReason::Name));
        return part;
    }
    let mut allowed: Vec<&InstanceSpec> = Vec::with_capacity(spec.instances.len());
    for i in &spec.instances {
        match policy.refuse_addr(i.addr, tcp_listeners) {
            Some(reason) => part.refused.push(refused(Some(i), None, reason)),
            None => allowed.push(i),
        }
    }
    let http: Vec<&InstanceSpec> = allowed.iter().copied().filter(|i| i.tags.takes_http()).collect();
    if !http.is_empty() {
        part.http = Some(Arc::new(new_backend(spec, &http, health)));
        if local {
            compile_local_http(spec, &name, &http, names, &mut part);
        } else {
            let host = dotted(&[&name, "service", &dc, &names.domain]);
            part.claims.push(Claim::Host(host.into(), names.root.clone()));
        }
    }
    // Another datacenter's ports are that datacenter's load balancers' business.
    let tcp: Vec<&InstanceSpec> = allowed.iter().copied().filter(|i| i.tags.tcp_port.is_some()).collect();
    if local && !tcp.is_empty() {
        let mut ports: BTreeSet<u16> = tcp.iter().filter_map(|i| i.tags.tcp_port).collect();
        ports.retain(|&port| match policy.refuse_tcp_port(port) {
            Some(reason) => {
                part.refused.push(refused(None, Some(port), reason));
                false
            }
            None => true,
        });
        check_agreement(spec, "haproxy_tcp", &tcp, &mut part.notes, |t| {
            t.tcp_port.iter().map(u16::to_string).collect()
        });
        if !ports.is_empty() {
            part.tcp = Some((Arc::new(new_backend(spec, &tcp, health)), ports.into_iter().collect()));
        }
    }
    part
}

/// The names, routes and prefixes of a local service's HTTP backend.
fn compile_local_http(spec: &ServiceSpec, name: &str, http: &[&InstanceSpec], names: &Naming, part: &mut Part) {
    let domain = &names.domain;
    let mut hosts = vec![
        format!("{name}.service"),
        dotted(&[name, "service", domain]),
        dotted(&[name, "service", &names.local_dc, domain]),
    ];
    if let Some(add) = &names.add_domain {
        hosts.push(format!("{name}{add}"));
    }
    part.claims
        .extend(hosts.into_iter().map(|h| Claim::Host(h.into(), names.root.clone())));
    part.local_name = Some(name.into());

    check_agreement(spec, "haproxy_route", http, &mut part.notes, |t| t.routes.clone());
    let routes: BTreeSet<&str> = http
        .iter()
        .flat_map(|i| i.tags.routes.iter().map(String::as_str))
        .collect();
    for route in routes {
        part.claims
            .push(Claim::Path(route.into(), format!("haproxy_route {route}")));
    }

    check_agreement(spec, "urlprefix-", http, &mut part.notes, |t| {
        t.fabio
            .iter()
            .map(|p| format!("{}{}", p.host.as_deref().unwrap_or(""), p.path))
            .collect()
    });
    let prefixes: BTreeSet<(Option<&str>, &str)> = http
        .iter()
        .flat_map(|i| i.tags.fabio.iter().map(|p| (p.host.as_deref(), p.path.as_str())))
        .collect();
    for (host, path) in prefixes {
        part.claims.push(match host {
            Some(host) => Claim::Host(host.into(), path.into()),
            None => Claim::Path(path.into(), format!("urlprefix-{path}")),
        });
    }
}

fn new_backend(spec: &ServiceSpec, members: &[&InstanceSpec], health: &Carryover) -> Backend {
    let instances = members
        .iter()
        .map(|i| BackendInstance {
            id: i.id.clone(),
            node: i.node.clone(),
            addr: i.addr,
            weight: i.tags.weight,
            health: health.get(i.addr),
            httpchk: i.tags.httpchk.clone(),
        })
        .collect();
    Backend::new(
        spec.name.clone(),
        spec.datacenter.clone(),
        instances,
        health.route_counters(&spec.name, &spec.datacenter),
    )
}

/// Warns when the instances of one service disagree on a tag: the union is used,
/// which is right during a rolling change and worth a look otherwise.
fn check_agreement(
    spec: &ServiceSpec,
    what: &str,
    members: &[&InstanceSpec],
    notes: &mut Vec<String>,
    values: impl Fn(&InstanceTags) -> Vec<String>,
) {
    let sets: Vec<BTreeSet<String>> = members.iter().map(|i| values(&i.tags).into_iter().collect()).collect();
    if sets.windows(2).all(|w| w[0] == w[1]) {
        return;
    }
    let union: BTreeSet<&String> = sets.iter().flatten().collect();
    let union: Vec<&str> = union.into_iter().map(String::as_str).collect();
    notes.push(format!(
        "service '{}' ({}): instances disagree on {what} tags; using all of: {}",
        spec.name,
        spec.datacenter,
        union.join(", ")
    ));
}

/// The warning for a claim lost to an earlier (alphabetically first) service.
fn conflict(what: &str, winner: &Backend, loser: &Backend) -> String {
    format!(
        "{what} is claimed by services {} and {}; {} wins",
        label(winner),
        label(loser),
        label(winner)
    )
}
