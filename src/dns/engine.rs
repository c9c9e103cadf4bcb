//! The question router and answer cache: every query, from UDP or TCP, ends here.
//!
//! ```text
//!  packet ─parse (once)─▶ allowed? ──no──▶ REFUSED
//!    │ fast path (classify, inline in the receive loop, no task, no allocation):
//!    ├─ not Consul, and the cache holds a valid pre-encoded answer ─▶ finish() ─▶ send
//!    │  else Verdict::Resolve(the parsed query):
//!    ├─ *.consul over UDP, Consul on loopback ─▶ the worker's own Consul socket
//!    │                            (inline.rs: merged per worker, never cached)
//!    │ slow path (resolve_query, a tokio task, with the parse taken along):
//!    ├─ *.consul ───────────────▶ ConsulAsker (consul_ask.rs: merged, never cached)
//!    ├─ consul A/AAAA, mode lb ─▶ LB hosts   ┐
//!    ├─ wildcard domain ────────▶ LB hosts   ├─ local answer, cached under the
//!    ├─ zones_dir zone ─────────▶ Catalog    ┘  current generation
//!    └─ anything else ──────────▶ upstream forwarder ─▶ cached by TTL (RFC 2308 for
//!                                  negatives), stale served on failure (RFC 8767)
//! ```
//!
//! Cache entries are [`Template`]s keyed by question (type, class, DO/CD, name), so
//! an answer is encoded once and only patched per client. Local answers carry the
//! generation they were built in; a change of LB hosts or zones bumps the
//! generation and they are rebuilt on next use.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::rr::Name;
use ipnet::IpNet;
use moka::Expiry;
use moka::sync::Cache;

use super::consul_ask::{ConsulAsker, FAILURE_LOG_EVERY};
use super::forward::{ForwardOptions, Forwarder};
use super::settings::{ConsulARecords, DnsConfig};
use super::stats::{AnswerSource, DnsStats};
use super::wildcard::LbAnswers;
use super::wire::{self, Malformed, ParsedQuery, Template, Transport, TtlRewrite, rcode, rtype};
use super::zones::Zones;
use crate::consul::settings::ConsulConfig;
use crate::report::throttle::LogEvery;

/// TTL of a stale answer (RFC 8767 section 4 suggests 30 seconds).
const STALE_TTL: u32 = 30;
/// Local answers are rebuilt at least this often even without a generation change.
const LOCAL_ENTRY_LIFETIME: Duration = Duration::from_secs(3600);
/// Class IN.
const CLASS_IN: u16 = 1;
/// What a cache entry costs besides its key and answer bytes: the entry, its
/// `Arc`, and moka's bookkeeping (hash slot, LRU and timer nodes), estimated.
const ENTRY_OVERHEAD: usize = 256;

#[derive(Debug)]
enum EntryKind {
    /// From an upstream, valid until `fresh_until`, then stale.
    Upstream,
    /// Built here from LB hosts or zones, valid while the generation holds.
    Local { generation: u64, route: AnswerSource },
}

#[derive(Debug)]
struct Entry {
    template: Template,
    stored: Instant,
    fresh_until: Instant,
    kind: EntryKind,
}

struct EntryExpiry {
    serve_stale: Duration,
}

/// The bytes an entry holds, for the cache's byte bound.
fn entry_weight(key: &[u8], entry: &Entry) -> u32 {
    let template = &entry.template;
    let bytes = ENTRY_OVERHEAD + key.len() + template.wire.len() + 2 * template.ttl_offsets.len();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// The answer cache: at most `bytes` by [`entry_weight`], entries expiring
/// after their TTL plus the serve-stale window.
#[allow(clippy::borrowed_box)] // the weigher takes what moka passes: &K with K = Box<[u8]>
fn answer_cache(bytes: u64, serve_stale: Duration) -> Cache<Box<[u8]>, Arc<Entry>> {
    Cache::builder()
        .max_capacity(bytes)
        .weigher(|key: &Box<[u8]>, entry: &Arc<Entry>| entry_weight(key.as_ref(), entry))
        .expire_after(EntryExpiry { serve_stale })
        .build()
}

impl Expiry<Box<[u8]>, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _key: &Box<[u8]>, value: &Arc<Entry>, created_at: Instant) -> Option<Duration> {
        Some(value.fresh_until.saturating_duration_since(created_at) + self.serve_stale)
    }

    fn expire_after_update(
        &self,
        key: &Box<[u8]>,
        value: &Arc<Entry>,
        updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// What the caller of [`Engine::classify`] should do with a packet.
pub enum Verdict<'a> {
    /// The response is in the output buffer: send it.
    Answered,
    /// Needs the slow path ([`Engine::resolve_query`]), or for a Consul
    /// question ([`Engine::is_consul_forwarded`]) a UDP worker's own Consul
    /// client: the parse goes along, so the packet is never parsed again.
    Resolve(ParsedQuery<'a>),
    /// Do not answer.
    Drop,
}

/// Routes questions and owns the answer cache.
pub struct Engine {
    allow: Vec<IpNet>,
    /// The host's own addresses, always clients (asked only outside `allow`).
    own: crate::net::host::OwnAddresses,
    consul_zone: Vec<u8>,
    lb_for_consul: bool,
    wildcard: Option<(Name, Vec<u8>)>,
    lb: Arc<LbAnswers>,
    zones: Arc<Zones>,
    consul: ConsulAsker,
    upstream: Forwarder,
    cache: Cache<Box<[u8]>, Arc<Entry>>,
    generation: AtomicU64,
    max_ttl: u32,
    negative_max_ttl: u32,
    serve_stale: Duration,
    stats: Arc<DnsStats>,
    inflight: AtomicUsize,
    max_inflight: usize,
    upstream_log: LogEvery,
}

impl Engine {
    /// Builds the engine; must run inside the tokio runtime (forwarder
    /// sockets). The forwarders' socket readers run in `readers`.
    pub fn new(
        dns: &DnsConfig,
        consul: &ConsulConfig,
        lb: Arc<LbAnswers>,
        zones: Arc<Zones>,
        stats: Arc<DnsStats>,
        readers: super::forward::ReaderTasks,
    ) -> Self {
        Self {
            allow: dns.allow.clone(),
            own: crate::net::host::OwnAddresses::new(),
            consul_zone: wire::name_to_wire(&consul.domain),
            lb_for_consul: dns.consul_a_records == ConsulARecords::Lb,
            wildcard: dns.wildcard_domain.as_ref().map(|n| (n.clone(), wire::name_to_wire(n))),
            lb,
            zones,
            consul: ConsulAsker::new(dns, consul, stats.clone(), readers.clone()),
            upstream: Forwarder::new(
                &dns.upstreams,
                ForwardOptions {
                    timeout: dns.upstream_timeout,
                    recursion: true,
                    payload: wire::MAX_UDP_PAYLOAD,
                    pool_loopback: false,
                    max_forwarded: dns.max_forwarded,
                },
                readers,
            ),
            cache: answer_cache(dns.cache_bytes, dns.serve_stale),
            generation: AtomicU64::new(1),
            max_ttl: dns.max_ttl,
            negative_max_ttl: dns.negative_max_ttl,
            serve_stale: dns.serve_stale,
            stats,
            inflight: AtomicUsize::new(0),
            max_inflight: dns.max_inflight,
            upstream_log: LogEvery::new(FAILURE_LOG_EVERY),
        }
    }

    /// Invalidates every local answer (LB hosts changed).
    pub fn local_data_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Zones changed: local answers are rebuilt, and cached upstream answers that
    /// a new zone may now shadow are dropped.
    pub fn zones_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.cache.invalidate_all();
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.stats
    }

    /// True when `ip` may ask us questions: inside `allow`, or one of this
    /// host's own addresses (its queries to the docker bridge may arrive
    /// masqueraded from its outward address).
    #[inline]
    pub fn allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&ip)) || self.own.contains(ip)
    }

    /// The hot path: answers what needs no I/O into `out`.
    pub fn classify<'a>(
        &self,
        packet: &'a [u8],
        src: SocketAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Verdict<'a> {
        let query = match wire::parse_query(packet) {
            Ok(q) => q,
            Err(Malformed::Drop) => {
                self.stats.count_dropped();
                return Verdict::Drop;
            }
            Err(Malformed::Reply { id, flags, rcode }) => {
                wire::header_error(id, flags, rcode, out);
                self.stats.at(AnswerSource::Rejected).answered(rcode);
                return Verdict::Answered;
            }
        };
        if !self.allowed(src.ip()) {
            wire::error_response(&query, u16::from(rcode::REFUSED), out);
            self.stats.at(AnswerSource::Rejected).answered(rcode::REFUSED);
            return Verdict::Answered;
        }
        if query.edns.is_some_and(|e| e.version > 0) {
            // RFC 6891 6.1.3: BADVERS (16) for versions we do not speak.
            wire::error_response(&query, 16, out);
            self.stats.at(AnswerSource::Rejected).answered(16);
            return Verdict::Answered;
        }
        let limit = query.response_limit(transport);
        if self.answer_from_cache(&query, limit, out) {
            Verdict::Answered
        } else {
            Verdict::Resolve(query)
        }
    }

    /// True when `query` goes to the Consul forwarder (a `*.consul` name not
    /// answered with LB hosts): what a UDP worker may ask Consul itself.
    pub fn is_consul_forwarded(&self, query: &ParsedQuery<'_>) -> bool {
        wire::name_in_zone(query.qname, &self.consul_zone) && !self.is_lb_consul_question(query)
    }

    /// Who asks Consul.
    pub fn consul(&self) -> &ConsulAsker {
        &self.consul
    }

    fn is_lb_consul_question(&self, query: &ParsedQuery<'_>) -> bool {
        self.lb_for_consul
            && matches!(query.qtype, rtype::A | rtype::AAAA)
            && wire::is_service_name(query.qname, &self.consul_zone)
    }

    /// Writes the cached answer to `query` into `out`, counted; `false` when
    /// there is none (or it is no longer valid). Inlined always: it is most of
    /// [`Engine::classify`], the hot path, and its second caller (the slow
    /// path) would otherwise make it a call of its own there.
    #[inline(always)]
    fn answer_from_cache(&self, query: &ParsedQuery<'_>, limit: usize, out: &mut Vec<u8>) -> bool {
        if wire::name_in_zone(query.qname, &self.consul_zone) && !self.is_lb_consul_question(query) {
            return false;
        }
        let mut key_buf = [0u8; wire::MAX_KEY_LEN];
        let key = query.key(&mut key_buf);
        let Some(entry) = self.cache.get(key) else {
            return false;
        };
        let (ttl, route) = match entry.kind {
            EntryKind::Local { generation, route } => {
                if generation != self.generation.load(Ordering::Relaxed) {
                    return false;
                }
                (TtlRewrite::Keep, route)
            }
            EntryKind::Upstream => {
                let now = Instant::now();
                if now >= entry.fresh_until {
                    return false;
                }
                let age = now.saturating_duration_since(entry.stored).as_secs() as u32;
                (TtlRewrite::Age(age), AnswerSource::Upstream)
            }
        };
        wire::finish(&entry.template, query, ttl, limit, out);
        let stats = self.stats.at(route);
        stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        stats.answered(entry.template.rcode);
        true
    }

    /// Claims a slot for a slow-path query; `None` when overloaded (the query is
    /// dropped and counted, like a full socket buffer would).
    pub fn admit(self: &Arc<Self>) -> Option<InflightSlot> {
        let now = self.inflight.fetch_add(1, Ordering::Relaxed);
        if now >= self.max_inflight {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            self.stats.count_dropped();
            return None;
        }
        Some(InflightSlot(self.clone()))
    }

    /// Both paths for `packet`: [`Engine::classify`], then, when it needs it,
    /// [`Engine::resolve_query`]; `None` means no answer is sent.
    pub async fn resolve(&self, packet: &[u8], src: SocketAddr, transport: Transport) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        match self.classify(packet, src, transport, &mut out) {
            Verdict::Answered => Some(out),
            Verdict::Drop => None,
            Verdict::Resolve(query) => Some(self.resolve_query(&query, src, transport).await),
        }
    }

    /// The slow path: answers `query`, which [`Engine::classify`] gave back
    /// with [`Verdict::Resolve`] (allowed, and not in the cache then), into a
    /// new response. The cache is looked at again: an answer may have come
    /// since (TCP, or a merged query that just finished).
    pub async fn resolve_query(&self, query: &ParsedQuery<'_>, src: SocketAddr, transport: Transport) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let limit = query.response_limit(transport);
        if self.answer_from_cache(query, limit, &mut out) {
            return out;
        }
        let mut key_buf = [0u8; wire::MAX_KEY_LEN];
        let key = query.key(&mut key_buf);

        let in_consul = wire::name_in_zone(query.qname, &self.consul_zone);
        if in_consul && !self.is_lb_consul_question(query) {
            return self.consul.resolve(query, key, limit, out).await;
        }
        let apex = self
            .wildcard
            .as_ref()
            .filter(|(_, apex_wire)| !in_consul && wire::name_in_zone(query.qname, apex_wire))
            .map(|(apex, _)| apex);
        let zones = self.zones.current();
        let local = if in_consul || apex.is_some() {
            Some(AnswerSource::Lb)
        } else if zones.contains(query.qname) {
            Some(AnswerSource::Zone)
        } else {
            None
        };
        if let Some(route) = local {
            // Local data exists in class IN only (RFC 1035 3.2.4); CH and friends
            // for these names are refused rather than answered with IN records.
            if query.qclass != CLASS_IN {
                wire::error_response(query, u16::from(rcode::REFUSED), &mut out);
                self.stats.at(route).answered(rcode::REFUSED);
                return out;
            }
            let generation = self.generation.load(Ordering::Relaxed);
            let answer = match route {
                AnswerSource::Zone => zones.lookup(query.packet, src).await,
                _ => self.lb.answer(query, apex).ok_or(rcode::SERVFAIL),
            };
            return self.local_answer(query, key, answer, route, generation, limit, out);
        }
        drop(zones);
        if matches!(query.qtype, rtype::AXFR | rtype::IXFR) {
            wire::error_response(query, u16::from(rcode::REFUSED), &mut out);
            self.stats.at(AnswerSource::Upstream).answered(rcode::REFUSED);
            return out;
        }
        self.forward_upstream(query, key, limit, out).await
    }

    #[allow(clippy::too_many_arguments)]
    fn local_answer(
        &self,
        query: &ParsedQuery<'_>,
        key: &[u8],
        answer: Result<Vec<u8>, u8>,
        route: AnswerSource,
        generation: u64,
        limit: usize,
        mut out: Vec<u8>,
    ) -> Vec<u8> {
        let stats = self.stats.at(route);
        let template = match answer.map(|a| wire::make_template(&a).ok_or(rcode::SERVFAIL)) {
            Ok(Ok(t)) => t,
            Ok(Err(code)) | Err(code) => {
                wire::error_response(query, u16::from(code), &mut out);
                stats.answered(code);
                return out;
            }
        };
        wire::finish(&template, query, TtlRewrite::Keep, limit, &mut out);
        stats.answered(template.rcode);
        let now = Instant::now();
        self.cache.insert(
            key.into(),
            Arc::new(Entry {
                template,
                stored: now,
                fresh_until: now + LOCAL_ENTRY_LIFETIME,
                kind: EntryKind::Local { generation, route },
            }),
        );
        out
    }

    /// How long an upstream answer may be cached: positive answers by their
    /// smallest TTL, NXDOMAIN/NODATA by the SOA (RFC 2308 5); errors never.
    fn cache_ttl(&self, t: &Template) -> Option<u32> {
        let ttl = match t.rcode {
            rcode::NOERROR if t.answers > 0 => t.min_answer_ttl.map(|v| v.min(self.max_ttl)),
            rcode::NOERROR | rcode::NXDOMAIN => t.negative_ttl.map(|v| v.min(self.negative_max_ttl)),
            _ => None,
        };
        ttl.filter(|&v| v > 0)
    }

    async fn forward_upstream(&self, query: &ParsedQuery<'_>, key: &[u8], limit: usize, mut out: Vec<u8>) -> Vec<u8> {
        let stats = self.stats.at(AnswerSource::Upstream);
        let previous = self.cache.get(key);
        if let Some(entry) = &previous {
            // A fresh answer can appear between the fast path and here (TCP, or a
            // merged query that just finished).
            let now = Instant::now();
            if matches!(entry.kind, EntryKind::Upstream) && now < entry.fresh_until {
                let age = now.saturating_duration_since(entry.stored).as_secs() as u32;
                wire::finish(&entry.template, query, TtlRewrite::Age(age), limit, &mut out);
                stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                stats.answered(entry.template.rcode);
                return out;
            }
        }
        if self.upstream.servers().is_empty() {
            if let Some(failures) = self.upstream_log.event() {
                tracing::warn!(
                    failures,
                    name = %wire::name_to_string(query.qname),
                    "no upstream resolver (see the dns start-up warning); SERVFAIL (logged at most every 10 s)"
                );
            }
            wire::error_response(query, u16::from(rcode::SERVFAIL), &mut out);
            stats.answered(rcode::SERVFAIL);
            return out;
        }
        let result = self.upstream.resolve(key, query, stats).await;
        let failed = match &result {
            Ok(t) => matches!(t.rcode, rcode::SERVFAIL | rcode::REFUSED),
            Err(_) => true,
        };
        if failed {
            let stale = previous
                .filter(|e| matches!(e.kind, EntryKind::Upstream) && Instant::now() < e.fresh_until + self.serve_stale);
            if let Some(entry) = stale {
                wire::finish(&entry.template, query, TtlRewrite::Fixed(STALE_TTL), limit, &mut out);
                stats.stale_served.fetch_add(1, Ordering::Relaxed);
                stats.answered(entry.template.rcode);
                return out;
            }
        }
        match result {
            Ok(template) => {
                wire::finish(&template, query, TtlRewrite::Keep, limit, &mut out);
                stats.answered(template.rcode);
                if let Some(ttl) = self.cache_ttl(&template) {
                    let now = Instant::now();
                    self.cache.insert(
                        key.into(),
                        Arc::new(Entry {
                            template: Arc::unwrap_or_clone(template),
                            stored: now,
                            fresh_until: now + Duration::from_secs(u64::from(ttl)),
                            kind: EntryKind::Upstream,
                        }),
                    );
                }
            }
            Err(error) => {
                if let Some(failures) = self.upstream_log.event() {
                    tracing::warn!(%error, failures, name = %wire::name_to_string(query.qname), "upstream resolvers did not answer; SERVFAIL (logged at most every 10 s, with the failures since the last line)");
                }
                wire::error_response(query, u16::from(rcode::SERVFAIL), &mut out);
                stats.answered(rcode::SERVFAIL);
            }
        }
        out
    }
}

/// A claimed slow-path slot, released on drop.
pub struct InflightSlot(Arc<Engine>);

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big_entry(bytes: usize) -> Arc<Entry> {
        let now = Instant::now();
        Arc::new(Entry {
            template: Template {
                wire: vec![0u8; bytes].into_boxed_slice(),
                ttl_offsets: vec![0u16; 16].into_boxed_slice(),
                rcode: rcode::NOERROR,
                answers: 1,
                min_answer_ttl: Some(300),
                negative_ttl: None,
            },
            stored: now,
            fresh_until: now + Duration::from_secs(300),
            kind: EntryKind::Upstream,
        })
    }

    /// The cache is bounded by bytes, not entries: 200 answers of 60 KiB (12 MB)
    /// into a 1 MiB cache leave at most 1 MiB, and small answers still fit by
    /// the thousand.
    #[test]
    fn the_cache_is_bounded_by_bytes() {
        const LIMIT: u64 = 1 << 20;
        let cache = answer_cache(LIMIT, Duration::from_secs(60));
        for i in 0..200u32 {
            let key: Box<[u8]> = format!("big{i}").into_bytes().into();
            cache.insert(key, big_entry(60 * 1024));
            cache.run_pending_tasks();
            assert!(
                cache.weighted_size() <= LIMIT,
                "after {i}: {} bytes",
                cache.weighted_size()
            );
        }
        let big = cache.entry_count();
        assert!(big <= 17, "{big} answers of 60 KiB in 1 MiB");
        assert!(
            cache.weighted_size() > LIMIT / 2,
            "the cache is used: {}",
            cache.weighted_size()
        );

        let cache = answer_cache(LIMIT, Duration::from_secs(60));
        for i in 0..20_000u32 {
            let key: Box<[u8]> = format!("small{i}").into_bytes().into();
            cache.insert(key, big_entry(100));
        }
        cache.run_pending_tasks();
        assert!(cache.weighted_size() <= LIMIT, "{} bytes", cache.weighted_size());
        let per_entry = entry_weight(b"small0", &big_entry(100)) as u64;
        assert!(
            cache.entry_count() >= LIMIT / per_entry / 2,
            "{} small answers kept",
            cache.entry_count()
        );
    }
}
