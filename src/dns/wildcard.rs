//! The load-balancer answers: the wildcard domain (`HAPROXY_ADD_DOMAIN`) and, with
//! `consul_a_records = "lb"`, A/AAAA for Consul service names.
//!
//! ```text
//!  static targets ─────────────────────────────────┐
//!  consul:SERVICE ─the process's Consul view───────┴─▶ targets (ArcSwap) ─▶ on_change()
//!  question under the domain ──answer()──▶ response bytes (A/AAAA = targets,
//!                                          SOA/NS at the apex, NODATA otherwise)
//! ```
//!
//! Answers are built on the slow path and cached by the engine as local data;
//! `on_change` bumps the engine's generation so no old answer is served after the
//! set of LB hosts changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::settings::WildcardTarget;
use super::wire::{ParsedQuery, rtype};
use crate::consul::CatalogView;

/// The current LB hosts and how to answer for them.
pub struct LbAnswers {
    /// Static targets from the configuration.
    static_targets: Vec<IpAddr>,
    /// Consul services whose passing instances are targets, with their last result.
    consul_targets: Mutex<BTreeMap<String, Vec<IpAddr>>>,
    /// The merged, sorted, de-duplicated set answered right now.
    current: ArcSwap<Vec<IpAddr>>,
    /// TTL of every answer.
    ttl: u32,
}

impl LbAnswers {
    /// From the configured targets; `consul:` targets start empty until their
    /// first watch result arrives.
    pub fn new(targets: &[WildcardTarget], ttl: u32) -> Arc<Self> {
        let static_targets: Vec<IpAddr> = targets
            .iter()
            .filter_map(|t| match t {
                WildcardTarget::Static(ip) => Some(*ip),
                WildcardTarget::ConsulService(_) => None,
            })
            .collect();
        let consul_targets = targets
            .iter()
            .filter_map(|t| match t {
                WildcardTarget::ConsulService(s) => Some((s.clone(), Vec::new())),
                WildcardTarget::Static(_) => None,
            })
            .collect();
        let this = Arc::new(Self {
            static_targets,
            consul_targets: Mutex::new(consul_targets),
            current: ArcSwap::from_pointee(Vec::new()),
            ttl,
        });
        this.recompute();
        this
    }

    /// The addresses answered now.
    pub fn targets(&self) -> Arc<Vec<IpAddr>> {
        self.current.load_full()
    }

    fn recompute(&self) -> bool {
        let mut all = self.static_targets.clone();
        for addrs in self.consul_targets.lock().values() {
            all.extend(addrs);
        }
        all.sort();
        all.dedup();
        let changed = **self.current.load() != all;
        if changed {
            self.current.store(Arc::new(all));
        }
        changed
    }

    /// True when some target is a Consul service (the view must be followed).
    pub fn follows_consul(&self) -> bool {
        !self.consul_targets.lock().is_empty()
    }

    /// Follows the `consul:` targets in `view` until `shutdown`; `on_change` runs
    /// whenever the answered set changes. Returns early only if the view stops.
    pub async fn follow(
        self: Arc<Self>,
        view: CatalogView,
        on_change: Arc<dyn Fn() + Send + Sync>,
        shutdown: CancellationToken,
    ) {
        let mut pictures = view.subscribe();
        loop {
            let picture = pictures.borrow_and_update().clone();
            let changed = {
                let mut map = self.consul_targets.lock();
                let mut changed = false;
                for (service, slot) in map.iter_mut() {
                    // Before the first complete picture, keep what we have: an empty
                    // answer is worse than an old one.
                    if !picture.complete {
                        continue;
                    }
                    let mut addrs: Vec<IpAddr> = picture
                        .services
                        .get(service)
                        .map(|e| e.passing().filter_map(|i| i.address.parse().ok()).collect())
                        .unwrap_or_default();
                    addrs.sort();
                    addrs.dedup();
                    if *slot != addrs {
                        *slot = addrs;
                        changed = true;
                    }
                }
                changed
            };
            if changed && self.recompute() {
                tracing::info!(targets = ?self.targets(), "wildcard targets changed");
                on_change();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = pictures.changed() => if r.is_err() {
                    tracing::error!("dns: the consul view has stopped; wildcard targets stay as they are");
                    return;
                },
            }
        }
    }

    /// The response for `query`, whose name is at or below `apex` (the wildcard
    /// domain) or, with `apex = None`, a Consul service name answered with LB hosts.
    pub fn answer(&self, query: &ParsedQuery<'_>, apex: Option<&Name>) -> Option<Vec<u8>> {
        let name = Name::read(&mut BinDecoder::new(query.qname)).ok()?.to_lowercase();
        let qtype = RecordType::from(query.qtype);
        let targets = self.targets();
        let mut answers = Vec::new();
        let mut authority = Vec::new();
        let at_apex = apex.is_some_and(|a| *a == name);
        let want_v4 = matches!(query.qtype, rtype::A) || qtype == RecordType::ANY;
        let want_v6 = matches!(query.qtype, rtype::AAAA) || qtype == RecordType::ANY;
        for ip in targets.iter() {
            let rdata = match ip {
                IpAddr::V4(v4) if want_v4 => RData::A(A(*v4)),
                IpAddr::V6(v6) if want_v6 => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            answers.push(Record::from_rdata(name.clone(), self.ttl, rdata));
        }
        if let Some(apex) = apex {
            let ns_name = Name::from_str("ns").ok()?.append_domain(apex).ok()?;
            if at_apex && qtype == RecordType::NS {
                answers.push(Record::from_rdata(
                    apex.clone(),
                    self.ttl,
                    RData::NS(NS(ns_name.clone())),
                ));
            }
            let soa = Record::from_rdata(
                apex.clone(),
                self.ttl,
                RData::SOA(SOA::new(
                    ns_name,
                    Name::from_str("hostmaster").ok()?.append_domain(apex).ok()?,
                    1,
                    3600,
                    600,
                    86400,
                    self.ttl,
                )),
            );
            if at_apex && qtype == RecordType::SOA {
                answers.push(soa);
            } else if answers.is_empty() {
                // NODATA: the SOA lets resolvers cache the absence (RFC 2308 3).
                authority.push(soa);
            }
        }
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = true;
        m.metadata.recursion_available = true;
        m.metadata.response_code = ResponseCode::NoError;
        let mut q = HQuery::query(name, qtype);
        q.set_query_class(DNSClass::from(query.qclass));
        m.add_query(q);
        m.add_answers(answers);
        m.add_authorities(authority);
        m.to_vec().ok()
    }
}
