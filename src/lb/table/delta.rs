//! The routing table kept up to date by delta: a change of one service costs
//! what that service touches, not what the table holds.
//!
//! ```text
//!  set(spec) / remove(name, dc) ──▶ pending (the latest per service and datacenter)
//!  apply(health):
//!    first table, or the haproxy_tcp listener ports moved ──▶ full build
//!    otherwise, per changed service: its old claims out, its new ones in, and
//!      only the keys it touched decided again (first claimant in SpecKey order)
//!    ──▶ table (persistent maps: shares every entry the delta did not touch)
//!        + the warnings that are new + the carryover told what left
//! ```
//!
//! What makes a delta possible is the claimant list of every key (host and
//! path, path, local name, TCP port): the full build decides a key by which
//! service claims it first, so the delta keeps every claimant of a key in that
//! order and routes the key to the first one. The outcome is the full build's
//! whatever the order of the changes: [`TableState::check`] compares the two,
//! after every delta in debug builds of small tables and in the property test
//! below.
//!
//! The TCP listener ports are an input of every part (an instance must not be
//! at one of the lb's own listeners), so a change of that set is a full build,
//! as is [`TableState::rebuild`], the watcher's periodic re-sync.
//!
//! Live addresses and routes follow the delta too: the state counts, per
//! address, the instances that have it, and tells the [`Carryover`] to
//! forget an address when its count reaches zero, and which routes left or
//! came back ([`Carryover::retire_routes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::carryover::Carryover;
use super::claims::{Claimant, Claimants, Claims, Key, Part, SpecKey};
use super::compile::{Builder, compile, key_warnings, listed_twice, listener_ports, same_group};
use super::routing::RoutingTable;
use super::spec::{Naming, ServiceSpec, TableConfig};

/// Tables of at most this many specs are compared with a full build after
/// every delta in debug builds (a full build per change would make the
/// larger catalogs of the integration tests slow, not wrong).
#[cfg(debug_assertions)]
const DEBUG_CHECK_MAX: usize = 256;

/// Where two tables route differently (the first differences, as text: each
/// names the decision on both sides).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct RouteDifferences(pub Vec<String>);

/// A routing table with what it takes to change it by delta.
#[derive(Debug)]
pub struct TableState {
    /// Naming inputs and policy of every table.
    config: TableConfig,
    /// `config`'s names, normalised once.
    names: Naming,
    /// Every spec by service and datacenter, with its compiled part while it is
    /// the one used (the first of its [`same_group`]; the others are only
    /// warned about).
    specs: BTreeMap<SpecKey, Held>,
    /// Changes not applied yet: the latest spec per key (`None`: gone).
    pending: BTreeMap<SpecKey, Option<ServiceSpec>>,
    /// The claimants of every key the table routes.
    claims: Claims,
    /// How many instances of the specs ask for each `haproxy_tcp` listener port.
    tcp_wanted: HashMap<u16, u32>,
    /// The listener ports the parts were compiled against.
    tcp_listeners: BTreeSet<u16>,
    /// How many instances of the specs have each address (the live ones).
    addrs: HashMap<SocketAddr, u32>,
    /// The table's warnings, with how many times each is made.
    warnings: HashMap<String, u32>,
    /// The table as of the last apply.
    table: RoutingTable,
    /// False until the first (full) build.
    built: bool,
}

/// One spec the table holds.
#[derive(Debug)]
struct Held {
    spec: ServiceSpec,
    /// What it asks of the table, while it is the spec used for its service.
    part: Option<Arc<Part>>,
}

/// What one [`TableState::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The table was built whole (the first table, a TCP listener change, a
    /// re-sync) rather than changed by delta.
    pub full: bool,
    /// Specs added, changed or removed.
    pub changed: usize,
    /// Warnings the table did not have before, sorted (the caller logs them).
    pub new_warnings: Vec<String>,
}

/// What may have left the tables in a delta, for the carryover: addresses
/// whose count reached zero (forgotten unless counted again since), routes
/// that went, and routes that came back.
#[derive(Default)]
struct Left {
    addrs: Vec<SocketAddr>,
    routes: Vec<SpecKey>,
    back: Vec<SpecKey>,
}

/// One (service, lower-case datacenter) a delta changes, with the spec and
/// part it used before the delta.
struct Group {
    name: Arc<str>,
    lower_dc: String,
    used: Option<Claimant>,
}

/// The keys a delta touched (with their warnings before it), and how the
/// count of each warning moves.
#[derive(Default)]
struct Work {
    touched: HashMap<Key, Vec<String>>,
    warn: HashMap<String, i64>,
}

impl Work {
    fn touch(&mut self, key: &Key, claims: &Claims) {
        if !self.touched.contains_key(key) {
            self.touched.insert(key.clone(), key_warnings(key, claims.get(key)));
        }
    }

    fn warn(&mut self, warning: String, by: i64) {
        *self.warn.entry(warning).or_default() += by;
    }
}

impl TableState {
    /// A state holding nothing; the first [`Self::apply`] builds the table.
    pub fn new(config: TableConfig) -> Self {
        Self {
            names: Naming::new(&config),
            table: RoutingTable::empty(&config),
            config,
            specs: BTreeMap::new(),
            pending: BTreeMap::new(),
            claims: HashMap::new(),
            tcp_wanted: HashMap::new(),
            tcp_listeners: BTreeSet::new(),
            addrs: HashMap::new(),
            warnings: HashMap::new(),
            built: false,
        }
    }

    /// The table as of the last apply (clone it to publish: O(1)).
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// Specs held.
    pub fn services(&self) -> usize {
        self.specs.len()
    }

    /// Distinct instance addresses of the specs.
    pub fn instances(&self) -> usize {
        self.addrs.len()
    }

    /// Every spec held, by service name then datacenter.
    pub fn specs(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.specs.values().map(|h| &h.spec)
    }

    /// The table's warnings, each once.
    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.warnings.keys().map(String::as_str)
    }

    /// Queues `spec` in place of what the table holds for its service and
    /// datacenter; false when that is what it holds already.
    pub fn set(&mut self, spec: ServiceSpec) -> bool {
        let key = SpecKey::of(&spec);
        if self.specs.get(&key).is_some_and(|held| held.spec == spec) {
            self.pending.remove(&key);
            return false;
        }
        self.pending.insert(key, Some(spec));
        true
    }

    /// Queues the removal of a service's spec in a datacenter; false when the
    /// table holds none.
    pub fn remove(&mut self, name: &str, datacenter: &str) -> bool {
        let key = SpecKey {
            name: name.into(),
            datacenter: datacenter.into(),
        };
        if self.specs.contains_key(&key) {
            self.pending.insert(key, None);
            true
        } else {
            self.pending.remove(&key);
            false
        }
    }

    /// Applies what was queued: by delta, or by a full build for the first
    /// table and when the TCP listener ports move.
    pub fn apply(&mut self, health: &Carryover) -> Applied {
        if !self.built {
            return self.rebuild(health);
        }
        if self.pending.is_empty() {
            return Applied::default();
        }
        let pending = std::mem::take(&mut self.pending);
        let changed = pending.len();
        let left = self.recount(&pending);
        if self.listeners_moved() {
            self.pending = pending;
            let mut applied = self.rebuild(health);
            applied.changed = changed;
            return applied;
        }
        let mut work = Work::default();
        let groups = self.groups(&pending, &mut work);
        let changed_keys: HashSet<SpecKey> = pending.keys().cloned().collect();
        self.store(pending);
        for group in groups {
            self.reclaim(group, &changed_keys, health, &mut work);
        }
        self.decide_touched(&mut work);
        let new_warnings = self.count_warnings(work.warn);
        health.forget(left.addrs.into_iter().filter(|a| !self.addrs.contains_key(a)));
        health.retire_routes(
            left.routes.iter().map(|k| (&*k.name, &*k.datacenter)),
            left.back.iter().map(|k| (&*k.name, &*k.datacenter)),
        );
        #[cfg(debug_assertions)]
        if self.specs.len() <= DEBUG_CHECK_MAX
            && let Err(e) = self.check()
        {
            panic!("lb: the routing table changed by delta differs from a full build: {e}");
        }
        Applied {
            full: false,
            changed,
            new_warnings,
        }
    }

    /// The first step of a delta: the listener ports and addresses wanted,
    /// counted again for the old and new spec of every change; returns what
    /// may have left (addresses whose count reached zero, routes that went or
    /// came back) for the carryover.
    fn recount(&mut self, pending: &BTreeMap<SpecKey, Option<ServiceSpec>>) -> Left {
        let mut left = Left::default();
        for (key, new) in pending {
            let old = self.specs.get(key).map(|h| &h.spec);
            if let Some(old) = old {
                count(
                    &self.config,
                    &mut self.tcp_wanted,
                    &mut self.addrs,
                    old,
                    -1,
                    &mut left.addrs,
                );
            }
            if let Some(new) = new {
                count(
                    &self.config,
                    &mut self.tcp_wanted,
                    &mut self.addrs,
                    new,
                    1,
                    &mut left.addrs,
                );
            }
            match (old.is_some(), new.is_some()) {
                (true, false) => left.routes.push(key.clone()),
                (false, true) => left.back.push(key.clone()),
                _ => {}
            }
        }
        left
    }

    /// True when the `haproxy_tcp` listener ports wanted are no longer those
    /// the table was built with (then the delta is a full build).
    fn listeners_moved(&self) -> bool {
        self.tcp_wanted.len() != self.tcp_listeners.len()
            || !self.tcp_listeners.iter().all(|p| self.tcp_wanted.contains_key(p))
    }

    /// The groups (service, lower-case datacenter) the changes fall in, each
    /// with the spec it used before; the "listed twice" warnings of the
    /// groups as they were are taken back.
    fn groups(&self, pending: &BTreeMap<SpecKey, Option<ServiceSpec>>, work: &mut Work) -> Vec<Group> {
        let mut groups = Vec::new();
        let mut seen = HashSet::new();
        for key in pending.keys() {
            let dc = key.datacenter.to_ascii_lowercase();
            if !seen.insert((key.name.clone(), dc.clone())) {
                continue;
            }
            let members = self.members(&key.name, &dc);
            let used = members
                .first()
                .and_then(|k| self.specs[k].part.clone().map(|p| (k.clone(), p)));
            for m in members.iter().skip(1) {
                work.warn(listed_twice(&self.specs[m].spec), -1);
            }
            groups.push(Group {
                name: key.name.clone(),
                lower_dc: dc,
                used,
            });
        }
        groups
    }

    /// One group after the changes are stored: when the spec it uses is
    /// another one, or was changed, the old part's claims go out and the new
    /// one's come in (touching their keys); its "listed twice" warnings are
    /// counted again.
    fn reclaim(&mut self, group: Group, changed_keys: &HashSet<SpecKey>, health: &Carryover, work: &mut Work) {
        let members = self.members(&group.name, &group.lower_dc);
        let first = members.first();
        let same = matches!((&group.used, first), (Some((k, _)), Some(f)) if k == f && !changed_keys.contains(f));
        if !same {
            if let Some((k, part)) = &group.used {
                self.withdraw(k, part, work);
                if let Some(held) = self.specs.get_mut(k) {
                    held.part = None;
                }
            }
            if let Some(f) = first {
                let part = self.part(f, health);
                self.activate(f, &part, work);
            }
        }
        for m in members.iter().skip(1) {
            work.warn(listed_twice(&self.specs[m].spec), 1);
        }
    }

    /// Decides again only the keys the delta touched: each goes to its first
    /// claimant, and its conflict warnings are counted anew.
    fn decide_touched(&mut self, work: &mut Work) {
        for (key, before) in std::mem::take(&mut work.touched) {
            for w in before {
                work.warn(w, -1);
            }
            let claimants = self.claims.get(&key);
            let winner = claimants
                .and_then(|c| c.as_slice().first())
                .and_then(|(_, part)| part.backend_for(&key))
                .cloned();
            for w in key_warnings(&key, claimants) {
                work.warn(w, 1);
            }
            self.table.put(&key, winner);
        }
    }

    /// Builds the table whole from the specs held (and what is queued): the
    /// first table, a TCP listener change, and the watcher's periodic re-sync.
    /// Parts of unchanged specs are reused (their backends keep their
    /// round-robin position) unless the listener ports moved.
    pub fn rebuild(&mut self, health: &Carryover) -> Applied {
        let pending = std::mem::take(&mut self.pending);
        let changed = pending.len();
        self.store(pending);
        self.tcp_wanted.clear();
        self.addrs.clear();
        for held in self.specs.values() {
            count(
                &self.config,
                &mut self.tcp_wanted,
                &mut self.addrs,
                &held.spec,
                1,
                &mut Vec::new(),
            );
        }
        let listeners: BTreeSet<u16> = self.tcp_wanted.keys().copied().collect();
        if listeners != self.tcp_listeners {
            // Instances must not reach the lb's own TCP listeners, so a change in
            // which ports they take is a change of every part.
            for held in self.specs.values_mut() {
                held.part = None;
            }
            self.tcp_listeners = listeners;
        }
        self.claims.clear();
        // About five keys per service (its names, its local name).
        self.claims.reserve(self.specs.len() * 5);
        let mut builder = Builder::new(&self.config, Some(&mut self.claims));
        let mut previous: Option<&ServiceSpec> = None;
        for (key, held) in self.specs.iter_mut() {
            // In key order a duplicate follows the spec used.
            if previous.is_some_and(|p| same_group(p, &held.spec)) {
                held.part = None;
                builder.warnings.push(listed_twice(&held.spec));
                continue;
            }
            let part = match &held.part {
                Some(part) => part.clone(),
                None => {
                    let part = Arc::new(compile(
                        &held.spec,
                        &self.names,
                        &self.config.policy,
                        &self.tcp_listeners,
                        health,
                    ));
                    held.part = Some(part.clone());
                    part
                }
            };
            builder.assemble(key, &part);
            let held: &Held = held;
            previous = Some(&held.spec);
        }
        let Builder { table, warnings, .. } = builder;
        let before = std::mem::take(&mut self.warnings);
        for w in warnings {
            *self.warnings.entry(w).or_default() += 1;
        }
        let mut new_warnings: Vec<String> = self
            .warnings
            .keys()
            .filter(|w| !before.contains_key(*w))
            .cloned()
            .collect();
        new_warnings.sort();
        self.table = table;
        self.built = true;
        health.retain(&self.addrs.keys().copied().collect());
        health.retain_routes(self.specs.keys().map(|k| (&*k.name, &*k.datacenter)));
        Applied {
            full: true,
            changed,
            new_warnings,
        }
    }

    /// Compares the table with a full build from the same specs, warnings
    /// included (each as many times): what a delta must always equal. `Err`
    /// lists the first differences.
    pub fn check(&self) -> Result<(), RouteDifferences> {
        let specs: Vec<ServiceSpec> = self.specs().cloned().collect();
        let (full, warnings) = RoutingTable::build(&self.config, &specs, &Carryover::new());
        let mut problems = differences("delta", &self.table.describe(), "full", &full.describe());
        let mut theirs: HashMap<&str, u32> = HashMap::new();
        for w in &warnings {
            *theirs.entry(w.as_str()).or_default() += 1;
        }
        let ours: HashMap<&str, u32> = self.warnings.iter().map(|(w, n)| (w.as_str(), *n)).collect();
        if ours != theirs {
            let mut ours: Vec<String> = ours.iter().map(|(w, n)| format!("{n}x {w}")).collect();
            let mut theirs: Vec<String> = theirs.iter().map(|(w, n)| format!("{n}x {w}")).collect();
            ours.sort();
            theirs.sort();
            problems.extend(differences("delta warning", &ours, "full warning", &theirs));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RouteDifferences(problems))
        }
    }

    /// Routes the same as `other` (the table before a re-sync, against the
    /// one it made): `Err` lists the first differences.
    pub fn same_routes(&self, other: &RoutingTable) -> Result<(), RouteDifferences> {
        let problems = differences("now", &self.table.describe(), "before", &other.describe());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RouteDifferences(problems))
        }
    }

    /// The specs of one service in one datacenter (any case), in key order:
    /// the first is the one used.
    fn members(&self, name: &Arc<str>, lower_dc: &str) -> Vec<SpecKey> {
        // The least key of the group: its datacenter in upper case.
        let start = SpecKey {
            name: name.clone(),
            datacenter: lower_dc.to_ascii_uppercase().into(),
        };
        self.specs
            .range(start..)
            .take_while(|(k, _)| k.name == *name && k.datacenter.eq_ignore_ascii_case(lower_dc))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The part of spec `key`, compiled when it has none.
    fn part(&mut self, key: &SpecKey, health: &Carryover) -> Arc<Part> {
        let held = self.specs.get_mut(key).expect("a member of the group is held");
        held.part
            .get_or_insert_with(|| {
                Arc::new(compile(
                    &held.spec,
                    &self.names,
                    &self.config.policy,
                    &self.tcp_listeners,
                    health,
                ))
            })
            .clone()
    }

    /// Takes the specs of `pending` in (parts are compiled when used).
    fn store(&mut self, pending: BTreeMap<SpecKey, Option<ServiceSpec>>) {
        for (key, new) in pending {
            match new {
                Some(spec) => {
                    self.specs.insert(key, Held { spec, part: None });
                }
                None => {
                    self.specs.remove(&key);
                }
            }
        }
    }

    /// Takes the claims of `part` (spec `key`) out of the table.
    fn withdraw(&mut self, key: &SpecKey, part: &Arc<Part>, work: &mut Work) {
        for w in part.warnings() {
            work.warn(w, -1);
        }
        self.table.refused.remove(key);
        self.table.backends.remove(key);
        for k in part.keys() {
            work.touch(&k, &self.claims);
            if let Some(list) = self.claims.get_mut(&k)
                && !list.remove(key)
            {
                self.claims.remove(&k);
            }
        }
    }

    /// Puts the claims of `part` (spec `key`) into the table.
    fn activate(&mut self, key: &SpecKey, part: &Arc<Part>, work: &mut Work) {
        for w in part.warnings() {
            work.warn(w, 1);
        }
        if !part.refused.is_empty() {
            self.table.refused.insert(key.clone(), part.clone());
        }
        if let Some(backend) = &part.http {
            self.table.backends.insert(key.clone(), backend.clone());
        }
        for k in part.keys() {
            work.touch(&k, &self.claims);
            let claimant = (key.clone(), part.clone());
            match self.claims.entry(k) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().insert(claimant),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Claimants::One(claimant));
                }
            }
        }
    }

    /// Moves the warning counts by `deltas`; returns the warnings that were
    /// not there before, sorted.
    fn count_warnings(&mut self, deltas: HashMap<String, i64>) -> Vec<String> {
        let mut fresh = Vec::new();
        for (w, by) in deltas {
            if by == 0 {
                continue;
            }
            let before = self.warnings.get(&w).copied().unwrap_or(0);
            let after = i64::from(before) + by;
            debug_assert!(after >= 0, "warning counted below zero: {w}");
            if after <= 0 {
                self.warnings.remove(&w);
            } else {
                if before == 0 {
                    fresh.push(w.clone());
                }
                self.warnings.insert(w, u32::try_from(after).unwrap_or(u32::MAX));
            }
        }
        fresh.sort();
        fresh
    }
}

/// Counts `spec`'s listener ports and instance addresses in (`by` 1) or out
/// (-1); addresses whose count reaches zero go to `gone`.
fn count(
    cfg: &TableConfig,
    tcp: &mut HashMap<u16, u32>,
    addrs: &mut HashMap<SocketAddr, u32>,
    spec: &ServiceSpec,
    by: i32,
    gone: &mut Vec<SocketAddr>,
) {
    for port in listener_ports(cfg, spec) {
        bump(tcp, port, by);
    }
    for i in &spec.instances {
        if !bump(addrs, i.addr, by) {
            gone.push(i.addr);
        }
    }
}

/// Adds `by` to the count of `key`; false when it is no longer counted.
fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K, by: i32) -> bool {
    if by > 0 {
        *map.entry(key).or_default() += by.unsigned_abs();
        return true;
    }
    match map.get_mut(&key) {
        Some(n) if *n > by.unsigned_abs() => {
            *n -= by.unsigned_abs();
            true
        }
        Some(_) => {
            map.remove(&key);
            false
        }
        None => false,
    }
}

/// The lines of `a` not in `b` and the other way round, at most 10 of each,
/// named by `an` and `bn`.
fn differences(an: &str, a: &[String], bn: &str, b: &[String]) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let sa: HashSet<&String> = a.iter().collect();
    let sb: HashSet<&String> = b.iter().collect();
    let mut out: Vec<String> = a
        .iter()
        .filter(|l| !sb.contains(l))
        .take(10)
        .map(|l| format!("only in {an}: {l}"))
        .collect();
    out.extend(
        b.iter()
            .filter(|l| !sa.contains(l))
            .take(10)
            .map(|l| format!("only in {bn}: {l}")),
    );
    if out.is_empty() {
        out.push(format!("{an} and {bn} list the same lines in another order"));
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::super::tests::spec;
    use super::*;
    use crate::lb::policy::BackendPolicy;
    use crate::lb::table::{Backend, Destination, InstanceSpec};
    use crate::lb::tags;

    fn cfg() -> TableConfig {
        let mut policy = BackendPolicy::default();
        policy.own.add("admin", "127.0.0.1:9090".parse().unwrap());
        policy.own.add("dns", "0.0.0.0:5353".parse().unwrap());
        TableConfig {
            consul_domain: "consul".into(),
            local_datacenter: "dc1".into(),
            add_domain: Some(".apps.example.com".into()),
            landing_hosts: vec!["localhost".into()],
            policy,
        }
    }

    fn inst(id: &str, addr: &str, tag_list: &[&str]) -> InstanceSpec {
        let (parsed, _) = tags::parse_tags(&tag_list.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        InstanceSpec {
            id: id.into(),
            node: "n1".into(),
            addr: addr.parse().unwrap(),
            tags: parsed,
        }
    }

    /// `service@dc` of a routing decision, with its kind.
    fn decision(table: &RoutingTable, host: Option<&str>, path: &str) -> String {
        let of = |b: &Backend| format!("{}@{}", b.service, b.datacenter);
        match table.route(host, path) {
            Destination::Backend(b) => of(b),
            Destination::OtherDatacenter(b) => format!("other-dc:{}", b.map_or("-".into(), |b| of(b))),
            Destination::Landing => "landing".into(),
            Destination::NotFound => "none".into(),
        }
    }

    /// Asks both tables every host they know (and the other-datacenter and
    /// add-domain forms of every name) on a set of paths, and every TCP port.
    fn same_decisions(a: &RoutingTable, b: &RoutingTable, names: &[&str]) -> Result<(), String> {
        let mut hosts: BTreeSet<Option<String>> = BTreeSet::from([None, Some("localhost".into())]);
        for t in [a, b] {
            hosts.extend(
                t.entries()
                    .into_iter()
                    .filter_map(|(h, _, _)| h.map(|h| Some(h.to_string()))),
            );
        }
        for n in names {
            let n = n.to_ascii_lowercase();
            for h in [
                format!("{n}.service.dc2.consul"),
                format!("{n}.service.dc9.consul"),
                format!("{n}.apps.example.com"),
                format!("{}.SERVICE.consul:80", n.to_ascii_uppercase()),
            ] {
                hosts.insert(Some(h));
            }
        }
        let paths = [
            "/", "/x", "/x/", "/x/y", "/x/yz", "/xy", "/f", "/f/g", "/v1", "/v1/a", "/v10", "/other",
        ];
        for host in &hosts {
            for path in paths {
                let (da, db) = (decision(a, host.as_deref(), path), decision(b, host.as_deref(), path));
                if da != db {
                    return Err(format!("{host:?} {path}: {da} vs {db}"));
                }
            }
        }
        let tcp = |t: &RoutingTable| -> Vec<(u16, String)> {
            t.tcp_ports()
                .map(|(p, b)| (p, format!("{}@{} {}", b.service, b.datacenter, b.instances.len())))
                .collect()
        };
        if tcp(a) != tcp(b) {
            return Err(format!("tcp {:?} vs {:?}", tcp(a), tcp(b)));
        }
        Ok(())
    }

    const NAMES: [&str; 7] = ["alpha", "beta", "Beta", "gamma", "web", "api", "bad/name"];
    const DCS: [&str; 4] = ["dc1", "dc1", "DC1", "dc2"];
    const ADDRS: [&str; 8] = [
        "10.0.0.1:8080",
        "10.0.0.2:8080",
        "10.0.0.3:8081",
        "10.0.0.4:5000",
        "127.0.0.1:5000",
        "127.0.0.1:5001",
        "127.0.0.1:9090",
        "10.0.0.5:80",
    ];
    const TAGS: [&str; 18] = [
        "haproxy",
        "haproxy",
        "haproxy",
        "haproxy_route=/x",
        "haproxy_route=/x/y",
        "haproxy_route=/",
        "haproxy_tcp=5000",
        "haproxy_tcp=5001",
        "haproxy_tcp=5353",
        "haproxy_weight=0",
        "haproxy_weight=5",
        "haproxy_httpchk=GET /",
        "urlprefix-shared.example.com/",
        "urlprefix-shared.example.com/v1",
        "urlprefix-/f",
        "urlprefix-/x",
        "urlprefix-web.service.consul/",
        "production",
    ];

    fn random_instance(rng: &mut StdRng, n: usize) -> InstanceSpec {
        let tags: Vec<&str> = (0..rng.random_range(0..4))
            .map(|_| TAGS[rng.random_range(0..TAGS.len())])
            .collect();
        inst(&format!("i{n}"), ADDRS[rng.random_range(0..ADDRS.len())], &tags)
    }

    /// One random change to `state`: a new or replaced spec, an instance added,
    /// removed or retagged (weights, routes, ports), or a spec removed.
    fn random_change(rng: &mut StdRng, state: &mut TableState, serial: &mut usize) {
        let held: Vec<ServiceSpec> = state.specs().cloned().collect();
        let pick = rng.random_range(0..10);
        if held.is_empty() || pick < 3 {
            let name = NAMES[rng.random_range(0..NAMES.len())];
            let dc = DCS[rng.random_range(0..DCS.len())];
            let instances = (0..rng.random_range(0..4))
                .map(|_| {
                    *serial += 1;
                    random_instance(rng, *serial)
                })
                .collect();
            state.set(spec(name, dc, instances));
            return;
        }
        let mut s = held[rng.random_range(0..held.len())].clone();
        match pick {
            3 | 4 => {
                *serial += 1;
                s.instances.push(random_instance(rng, *serial));
            }
            5 if !s.instances.is_empty() => {
                s.instances.remove(rng.random_range(0..s.instances.len()));
            }
            6 | 7 if !s.instances.is_empty() => {
                let i = rng.random_range(0..s.instances.len());
                let weight = ["haproxy_weight=1", "haproxy_weight=7", "haproxy_weight=0"][rng.random_range(0..3)];
                let tags: Vec<&str> = [weight, TAGS[rng.random_range(0..TAGS.len())], "haproxy"].into();
                let id = s.instances[i].id.clone();
                let addr = s.instances[i].addr.to_string();
                s.instances[i] = inst(&id, &addr, &tags);
            }
            _ => {
                state.remove(&s.name, &s.datacenter);
                return;
            }
        }
        state.set(s);
    }

    /// The carryover holds what the table uses: every instance's health and
    /// every backend's counters are the carryover's own (so ejections and
    /// counts outlive a delta), and it holds no address no spec has.
    fn carryover_matches(state: &TableState, health: &Carryover) -> Result<(), String> {
        let table = state.table();
        let tcp = table.tcp_ports().map(|(_, b)| b);
        for b in table.backends().chain(tcp) {
            for i in &b.instances {
                if !Arc::ptr_eq(&i.health, &health.get(i.addr)) {
                    return Err(format!(
                        "{} of {} has a health state the carryover forgot",
                        i.addr, b.service
                    ));
                }
            }
            if !Arc::ptr_eq(&b.counters, &health.route_counters(&b.service, &b.datacenter)) {
                return Err(format!("{}@{}: counters the carryover forgot", b.service, b.datacenter));
            }
        }
        let live: HashSet<SocketAddr> = state.specs().flat_map(|s| s.instances.iter().map(|i| i.addr)).collect();
        let held = health.by_addr.lock();
        if let Some(a) = held.keys().find(|a| !live.contains(a)) {
            return Err(format!("the carryover still holds {a}, which no spec has"));
        }
        Ok(())
    }

    fn run_sequence(seed: u64, steps: usize) -> Result<(), String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let health = Carryover::new();
        let mut state = TableState::new(cfg());
        let mut serial = 0;
        let (mut deltas, mut fulls) = (0, 0);
        for step in 0..steps {
            for _ in 0..rng.random_range(1..=3) {
                random_change(&mut rng, &mut state, &mut serial);
            }
            let applied = state.apply(&health);
            if applied.full {
                fulls += 1;
            } else {
                deltas += 1;
            }
            let at = |e: String| format!("seed {seed} step {step}: {e}");
            state.check().map_err(|e| at(e.to_string()))?;
            let specs: Vec<ServiceSpec> = state.specs().cloned().collect();
            let (full, _) = RoutingTable::build(&cfg(), &specs, &Carryover::new());
            same_decisions(state.table(), &full, &NAMES).map_err(at)?;
            carryover_matches(&state, &health).map_err(at)?;
        }
        if deltas == 0 || fulls == 0 {
            return Err(format!(
                "seed {seed}: {deltas} deltas and {fulls} full builds: not both paths"
            ));
        }
        Ok(())
    }

    /// Random sequences of service changes (instances added and removed, tags
    /// changed with route, Fabio and TCP conflicts between services, weights,
    /// duplicate lists, refusals, services removed), applied by delta: after
    /// each change the table routes every host, path and TCP port as a full
    /// build from the same specs does, with the same warnings.
    #[test]
    fn random_changes_by_delta_route_like_a_full_build() {
        for seed in 0..200 {
            let result = std::panic::catch_unwind(|| run_sequence(seed, 40));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("seed {seed}: panicked (see above)"),
            }
        }
    }

    /// The winner of a key leaves: the next claimant in name order takes it,
    /// and the conflict warning goes.
    #[test]
    fn the_next_claimant_takes_over_and_warnings_follow() {
        let health = Carryover::new();
        let mut state = TableState::new(cfg());
        let claim = |name: &str, last: u8| {
            spec(
                name,
                "dc1",
                vec![inst(
                    name,
                    &format!("10.0.1.{last}:80"),
                    &["haproxy", "haproxy_route=/x"],
                )],
            )
        };
        state.set(claim("beta", 2));
        state.set(claim("gamma", 3));
        let first = state.apply(&health);
        assert!(first.full);
        assert_eq!(first.new_warnings.len(), 1, "{:?}", first.new_warnings);
        assert_eq!(decision(state.table(), None, "/x"), "beta@dc1");
        state.set(claim("alpha", 1));
        let applied = state.apply(&health);
        assert!(!applied.full);
        assert_eq!(decision(state.table(), None, "/x"), "alpha@dc1");
        assert_eq!(applied.new_warnings.len(), 2, "{:?}", applied.new_warnings);
        assert!(applied.new_warnings.iter().all(|w| w.contains("'alpha' (dc1) wins")));
        assert_eq!(
            state.warnings().count(),
            2,
            "beta's win over gamma is no longer a warning"
        );
        state.remove("alpha", "dc1");
        state.remove("beta", "dc1");
        let applied = state.apply(&health);
        assert!(applied.new_warnings.is_empty());
        assert_eq!(decision(state.table(), None, "/x"), "gamma@dc1");
        assert_eq!(state.warnings().count(), 0);
        assert_eq!(health.addr_count(), 1, "alpha's and beta's addresses are forgotten");
    }

    /// A service listed twice (datacenters in two cases) uses the first list;
    /// when that one goes, the other takes its place.
    #[test]
    fn a_duplicate_list_takes_over_when_the_first_goes() {
        let health = Carryover::new();
        let mut state = TableState::new(cfg());
        state.set(spec("web", "dc1", vec![inst("a", "10.0.1.1:80", &["haproxy"])]));
        state.apply(&health);
        state.set(spec("web", "DC1", vec![inst("b", "10.0.1.2:80", &["haproxy"])]));
        let applied = state.apply(&health);
        assert!(!applied.full);
        assert_eq!(applied.new_warnings.len(), 1, "{:?}", applied.new_warnings);
        let addr = |t: &RoutingTable| match t.route(Some("web.service"), "/") {
            Destination::Backend(b) => b.instances[0].addr.to_string(),
            _ => "none".into(),
        };
        assert_eq!(addr(state.table()), "10.0.1.2:80", "'DC1' sorts before 'dc1'");
        state.remove("web", "DC1");
        state.apply(&health);
        assert_eq!(addr(state.table()), "10.0.1.1:80");
        assert_eq!(state.warnings().count(), 0);
    }

    /// A change touches only what it names: the next table shares every other
    /// backend with the previous one, and a spec equal to the one held is no change.
    #[test]
    fn a_delta_shares_what_it_did_not_touch() {
        let health = Carryover::new();
        let mut state = TableState::new(cfg());
        for n in 0..50u8 {
            state.set(spec(
                &format!("s{n}"),
                "dc1",
                vec![inst("i", &format!("10.0.2.{n}:80"), &["haproxy"])],
            ));
        }
        state.apply(&health);
        let before = state.table().clone();
        assert!(!state.set(spec("s7", "dc1", vec![inst("i", "10.0.2.7:80", &["haproxy"])])));
        assert!(state.set(spec(
            "s7",
            "dc1",
            vec![inst("i", "10.0.2.7:80", &["haproxy", "haproxy_weight=3"])]
        )));
        assert!(!state.apply(&health).full);
        let after = state.table();
        let ptrs = |t: &RoutingTable| t.backends().map(Arc::as_ptr).collect::<Vec<_>>();
        let (b, a) = (ptrs(&before), ptrs(after));
        let same = b.iter().zip(&a).filter(|(x, y)| x == y).count();
        assert_eq!((a.len(), same), (50, 49), "only s7's backend is new");
        assert_eq!(
            decision(&before, Some("s7.service"), "/"),
            "s7@dc1",
            "the old table is untouched"
        );
    }
}
