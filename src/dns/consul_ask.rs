//! Asking Consul: the one place for the rules of the Consul forwarder, on
//! both of its paths.
//!
//! ```text
//!  a *.consul question for Consul (Engine::is_consul_forwarded)
//!     ├─ UDP, Consul's first address on loopback and not held down while
//!     │  another is up (inline_now) ─▶ the worker's own socket (inline.rs),
//!     │  with a forwarder slot (take_slot), SERVFAIL at once when none (busy);
//!     │  answered ─▶ that address healthy or held down (inline_answered);
//!     │  failed ─▶ SERVFAIL when it is the only one (inline_failed), else
//!     │  resolve_after in a task, as for a truncated or failing answer
//!     │  when there are other addresses (has_fallback)
//!     └─ otherwise (TCP, the task path) ─▶ resolve: the Consul forwarder,
//!        merged, never cached
//!  every answer ─▶ finish (SERVFAIL for an error), counted under `consul`;
//!  every failure ─▶ log_failure (at most every 10 s)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::forward::{ExchangeError, FirstTry, ForwardError, ForwardOptions, Forwarder, ReaderTasks, now_ms};
use super::settings::DnsConfig;
use super::stats::{AnswerSource, DnsStats, RouteStats};
use super::wire::{self, ParsedQuery, Template, TtlRewrite, rcode};
use crate::consul::settings::ConsulConfig;
use crate::report::throttle::LogEvery;

/// EDNS payload we advertise to Consul: large, it is (nearly always) local.
pub(super) const CONSUL_PAYLOAD: u16 = 4096;

/// Failures to answer are logged at most this often (per path).
pub const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The Consul forwarder and the rules for asking it, inline or in a task.
pub struct ConsulAsker {
    forwarder: Forwarder,
    stats: Arc<DnsStats>,
    log: LogEvery,
}

impl ConsulAsker {
    /// The asker of `config`'s Consul agents; must run inside the tokio
    /// runtime (forwarder sockets), whose pooled sockets' readers run in `readers`.
    pub fn new(dns: &DnsConfig, consul: &ConsulConfig, stats: Arc<DnsStats>, readers: ReaderTasks) -> Self {
        let forwarder = Forwarder::new(
            &consul.dns,
            ForwardOptions {
                timeout: dns.consul_timeout,
                recursion: false,
                payload: CONSUL_PAYLOAD,
                pool_loopback: true,
                max_forwarded: dns.max_forwarded,
            },
            readers,
        );
        Self {
            forwarder,
            stats,
            log: LogEvery::new(FAILURE_LOG_EVERY),
        }
    }

    /// The counters of the `consul` route.
    pub fn stats(&self) -> &RouteStats {
        self.stats.at(AnswerSource::Consul)
    }

    /// The task path: asks the forwarder (merged with identical questions on
    /// the wire, `key` being the question's cache key) and writes the client's
    /// answer into `out`.
    pub async fn resolve(&self, query: &ParsedQuery<'_>, key: &[u8], limit: usize, mut out: Vec<u8>) -> Vec<u8> {
        let result = self.forwarder.resolve(key, query, self.stats()).await;
        if let Err(error) = &result {
            self.log_failure(error, query);
        }
        self.finish(&result, query, limit, &mut out);
        out
    }

    /// The client's answer to a Consul question from the forwarder's `result`
    /// (SERVFAIL for an error), counted.
    pub fn finish(
        &self,
        result: &Result<Arc<Template>, ForwardError>,
        query: &ParsedQuery<'_>,
        limit: usize,
        out: &mut Vec<u8>,
    ) {
        let stats = self.stats();
        match result {
            Ok(template) => {
                wire::finish(template, query, TtlRewrite::Keep, limit, out);
                stats.answered(template.rcode);
            }
            Err(_) => {
                wire::error_response(query, u16::from(rcode::SERVFAIL), out);
                stats.answered(rcode::SERVFAIL);
            }
        }
    }

    /// Logs that Consul did not answer `query` (at most every 10 s).
    pub fn log_failure(&self, error: &ForwardError, query: &ParsedQuery<'_>) {
        if let Some(failures) = self.log.event() {
            tracing::warn!(%error, failures, name = %wire::name_to_string(query.qname), "consul did not answer; SERVFAIL (logged at most every 10 s, with the failures since the last line)");
        }
    }

    /// Where a UDP worker may ask questions itself, on its own connected
    /// socket: the first address, when it is a pooled one (Consul on
    /// loopback), with the share of the deadline that address gets. `None`:
    /// every question goes through [`ConsulAsker::resolve`].
    pub fn inline_target(&self) -> Option<(SocketAddr, Duration)> {
        let servers = self.forwarder.servers();
        let first = servers.first().filter(|s| s.is_pooled())?;
        Some((first.addr(), self.forwarder.options().timeout / servers.len() as u32))
    }

    /// Whether a UDP worker should ask the first address itself now: yes
    /// unless it is held down while others are not (those come first then,
    /// through [`ConsulAsker::resolve`]).
    pub fn inline_now(&self) -> bool {
        let now = now_ms();
        match self.forwarder.servers().split_first() {
            Some((first, rest)) => !first.is_held_down(now) || rest.iter().all(|s| s.is_held_down(now)),
            None => false,
        }
    }

    /// Takes one `max_forwarded` slot for a UDP worker's own exchange; `false`
    /// when none is free (the question is then [`ConsulAsker::busy`]). Given
    /// back with [`ConsulAsker::release_slot`] or handed to
    /// [`ConsulAsker::resolve_after`].
    pub fn take_slot(&self) -> bool {
        self.forwarder.take_slot()
    }

    /// Gives back a slot taken with [`ConsulAsker::take_slot`].
    pub fn release_slot(&self) {
        self.forwarder.release_slot();
    }

    /// The error for a question that found every slot taken.
    pub fn busy(&self) -> ForwardError {
        ForwardError::Busy {
            limit: self.forwarder.options().max_forwarded,
        }
    }

    /// A UDP worker's own exchange with the first address got an answer:
    /// `failure` (SERVFAIL, REFUSED) holds that address down, any other clears it.
    pub fn inline_answered(&self, failure: bool) {
        if let Some(first) = self.forwarder.servers().first() {
            if failure { first.hold_down() } else { first.healthy() }
        }
    }

    /// A UDP worker's own exchange with the first address failed with
    /// `cause`: that address is held down. With no other address this is the
    /// question's final error (the worker answers SERVFAIL, as
    /// [`ConsulAsker::resolve`] would); `None`: hand it to
    /// [`ConsulAsker::resolve_after`].
    pub fn inline_failed(&self, cause: &ExchangeError) -> Option<ForwardError> {
        let servers = self.forwarder.servers();
        let first = servers.first()?;
        first.hold_down();
        (servers.len() == 1).then(|| self.forwarder.final_error(Some((first.addr(), cause.clone()))))
    }

    /// Whether a UDP worker must hand an exchange that failed with the first
    /// address over to [`ConsulAsker::resolve_after`] (there are others).
    pub fn has_fallback(&self) -> bool {
        self.forwarder.servers().len() > 1
    }

    /// Goes on in a task with a question a UDP worker asked the first address
    /// itself, `started` then, holding a slot from [`ConsulAsker::take_slot`]
    /// (released here): see [`Forwarder::resolve_after`]. Failures are logged.
    pub async fn resolve_after(
        &self,
        query: &ParsedQuery<'_>,
        started: Instant,
        first: FirstTry,
    ) -> Result<Arc<Template>, ForwardError> {
        let result = self.forwarder.resolve_after(query, self.stats(), started, first).await;
        if let Err(error) = &result {
            self.log_failure(error, query);
        }
        result
    }
}
