//! What services claim in a table and who wins: the [`Part`] one spec asks
//! for (its backends and the names they claim), the [`Key`]s claimed, and the
//! claimants of every key in [`SpecKey`] order (the first one wins).
//!
//! ```text
//!  ServiceSpec ──compile──▶ Part { http, tcp, claims: [Claim], refused }
//!  Part::keys() ──▶ Key (host+path │ path │ local name │ tcp port)
//!  Claims: Key ──▶ Claimants [(SpecKey, Part) ...] ──first──▶ RoutingTable::put
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use super::backend::Backend;
use super::spec::ServiceSpec;
use crate::lb::policy::Refused;

/// Lower-case bytes of `s`, for comparing names without allocating.
pub(super) fn lower(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().map(|b| b.to_ascii_lowercase())
}

/// A spec's (service, datacenter), ordered as conflicts are decided: by
/// lower-case name, name, lower-case datacenter, then datacenter. Two specs
/// that differ only in the datacenter's case are the same service listed
/// twice; the first in this order is used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SpecKey {
    pub(super) name: Arc<str>,
    pub(super) datacenter: Arc<str>,
}

impl SpecKey {
    pub(super) fn of(spec: &ServiceSpec) -> Self {
        Self {
            name: spec.name.as_str().into(),
            datacenter: spec.datacenter.as_str().into(),
        }
    }
}

impl Ord for SpecKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        lower(&self.name)
            .cmp(lower(&other.name))
            .then_with(|| self.name.cmp(&other.name))
            .then_with(|| lower(&self.datacenter).cmp(lower(&other.datacenter)))
            .then_with(|| self.datacenter.cmp(&other.datacenter))
    }
}

impl PartialOrd for SpecKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One thing services claim, whose first claimant (in [`SpecKey`] order) the
/// table routes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Key {
    /// A lower-case host name and a path prefix under it.
    Host(Arc<str>, Arc<str>),
    /// A host-independent path prefix.
    Path(Arc<str>),
    /// The `svc.service.<dc>.<domain>` fallback of a lower-case local service name.
    Local(Arc<str>),
    /// A `haproxy_tcp` port.
    Tcp(u16),
}

/// What one service spec asks of the table, worked out once and reused by the
/// next tables while the spec is unchanged.
#[derive(Debug, Default)]
pub(super) struct Part {
    /// The HTTP backend, when an instance takes HTTP.
    pub(super) http: Option<Arc<Backend>>,
    /// Lower-case service name for the `svc.service.<dc>.<domain>` fallback
    /// (local datacenter only).
    pub(super) local_name: Option<Arc<str>>,
    /// Claims of the HTTP backend, in the order they are made.
    pub(super) claims: Vec<Claim>,
    /// The TCP backend and its ports.
    pub(super) tcp: Option<(Arc<Backend>, Vec<u16>)>,
    /// Warnings about the service itself (instances that disagree on tags).
    pub(super) notes: Vec<String>,
    /// What the policy refused.
    pub(super) refused: Vec<Refused>,
}

impl Part {
    /// Every key the part claims, once each.
    pub(super) fn keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        if self.http.is_some() {
            keys.extend(self.local_name.iter().map(|n| Key::Local(n.clone())));
            keys.extend(self.claims.iter().map(Claim::key));
        }
        if let Some((_, ports)) = &self.tcp {
            keys.extend(ports.iter().map(|&p| Key::Tcp(p)));
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The backend the part puts at `key`.
    pub(super) fn backend_for(&self, key: &Key) -> Option<&Arc<Backend>> {
        match key {
            Key::Tcp(_) => self.tcp.as_ref().map(|(b, _)| b),
            _ => self.http.as_ref(),
        }
    }

    /// What each of the part's claims on `key` is called in a conflict warning
    /// (one per claim, as the full build warns once per lost claim).
    pub(super) fn claim_names(&self, key: &Key) -> Vec<String> {
        match key {
            Key::Tcp(port) => vec![format!("haproxy_tcp port {port}")],
            Key::Local(_) => Vec::new(),
            _ => self
                .claims
                .iter()
                .filter(|c| c.key() == *key)
                .map(|c| match c {
                    Claim::Host(host, path) if &**path == "/" => format!("host {host}"),
                    Claim::Host(host, path) => format!("host {host} path {path}"),
                    Claim::Path(_, what) => what.clone(),
                })
                .collect(),
        }
    }

    /// The part's own warnings (before any conflict with another service).
    pub(super) fn warnings(&self) -> impl Iterator<Item = String> + '_ {
        self.notes
            .iter()
            .cloned()
            .chain(self.refused.iter().map(Refused::to_string))
    }
}

/// One name the HTTP backend of a service claims (shared with every table
/// built from this part: no allocation per build).
#[derive(Debug)]
pub(super) enum Claim {
    /// A lower-case host name and a path prefix under it.
    Host(Arc<str>, Arc<str>),
    /// A host-independent path prefix, and what claims it (for warnings).
    Path(Arc<str>, String),
}

impl Claim {
    pub(super) fn key(&self) -> Key {
        match self {
            Claim::Host(host, path) => Key::Host(host.clone(), path.clone()),
            Claim::Path(path, _) => Key::Path(path.clone()),
        }
    }
}

/// A spec and the part it claims with.
pub(super) type Claimant = (SpecKey, Arc<Part>);

/// The claimants of each key (the first one wins): what lets a delta decide
/// again only the keys it touches.
pub(super) type Claims = HashMap<Key, Claimants>;

/// The claimants of one key, in [`SpecKey`] order, each spec once. Nearly
/// every key has one (a conflict is the exception), kept inline: the index
/// costs no allocation per key.
#[derive(Debug)]
pub(super) enum Claimants {
    One(Claimant),
    Many(Vec<Claimant>),
}

impl Claimants {
    pub(super) fn as_slice(&self) -> &[Claimant] {
        match self {
            Claimants::One(c) => std::slice::from_ref(c),
            Claimants::Many(v) => v,
        }
    }

    /// Adds (or replaces) the claim of `c`'s spec, in order.
    pub(super) fn insert(&mut self, c: Claimant) {
        match self {
            Claimants::One(one) if one.0 == c.0 => *one = c,
            Claimants::One(one) => {
                let mut list = vec![one.clone(), c];
                list.sort_by(|a, b| a.0.cmp(&b.0));
                *self = Claimants::Many(list);
            }
            Claimants::Many(list) => match list.binary_search_by(|(k, _)| k.cmp(&c.0)) {
                Ok(i) => list[i] = c,
                Err(i) => list.insert(i, c),
            },
        }
    }

    /// Takes `key`'s claim out; false when none is left.
    pub(super) fn remove(&mut self, key: &SpecKey) -> bool {
        match self {
            Claimants::One(one) => one.0 != *key,
            Claimants::Many(list) => {
                list.retain(|(k, _)| k != key);
                if list.len() == 1
                    && let Some(last) = list.pop()
                {
                    *self = Claimants::One(last);
                }
                !matches!(self, Claimants::Many(l) if l.is_empty())
            }
        }
    }
}
