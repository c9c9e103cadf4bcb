//! Consul questions answered from the UDP worker's own loop: no task, no
//! hand-off between threads, no allocation, for the common case (Consul on a
//! loopback address answering over UDP).
//!
//! ```text
//!  client datagram ─classify─▶ a *.consul question for the Consul forwarder
//!     │  (its parse from Verdict::Resolve; the rules are ConsulAsker's)
//!     ├─ first Consul address held down (another is up) ─▶ task path (Engine::resolve_query)
//!     ├─ this worker has it on the wire already ─▶ a waiter of that exchange (merged)
//!     ├─ table full (exchanges or waiters) ─▶ task path, counted (inline_overflow)
//!     └─ new exchange: ID random and unique in the table, 0x20 case, sent on
//!        the worker's socket connected to that address (one sendmmsg a batch)
//!  datagram on that socket (recvmmsg) ─ID─▶ exchange ─question byte for byte─▶
//!     ├─ answer ─▶ finished for every waiter into the worker's answer batch
//!     ├─ TC or cut, SERVFAIL/REFUSED with another address, malformed, ICMP
//!     │  refused, deadline ─▶ ConsulAsker::resolve_after in a task (TCP, the other
//!     │  addresses, all within dns.consul_timeout)
//!     └─ anything else (wrong ID, case or question: late, stray, spoofed) ─▶ ignored, counted
//!  only one Consul address, and it failed ─▶ SERVFAIL from the worker (logged, rate-limited)
//! ```
//!
//! The [`PendingTable`] holds the exchanges in flight, in fixed arrays made once
//! per worker: every exchange has the same time limit, so the oldest one has the
//! nearest deadline and the table keeps them in a list by age.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::consul_ask::CONSUL_PAYLOAD;
use super::engine::{Engine, InflightSlot};
use super::forward::{ExchangeError, FirstTry, ForwardError};
use super::outbox::Outbox;
use super::slow_path::SlowPath;
use super::wire::{self, Edns, MAX_KEY_LEN, ParsedQuery, Transport, TtlRewrite, rcode};
use crate::net::udp_batch::{OnSendError, RecvBatch, ReplyFrom, SendBatch};

/// No index.
const NONE: u16 = u16::MAX;
/// Datagrams received from Consul per syscall at most.
const BATCH: usize = 32;
/// Receive slot per Consul answer: what we advertise ([`CONSUL_PAYLOAD`]) and
/// room for a server that sends more (Consul has); longer ones are cut and
/// asked again over TCP.
const ANSWER_SLOT: usize = 8192;
/// Longest header + question: 12 + 255 + 4.
const HEAD_LEN: usize = wire::HEADER_LEN + 255 + 4;
/// Longest request we send: head + our OPT record.
const REQUEST_LEN: usize = HEAD_LEN + 11;

/// One question on the wire.
struct Exchange {
    /// Whether the slot is in use.
    live: bool,
    /// Our query ID (index into `by_id`).
    id: u16,
    /// The request as sent: the answer must echo its question byte for byte.
    request: Vec<u8>,
    /// The question's cache key, to merge identical questions.
    key: [u8; MAX_KEY_LEN],
    key_len: usize,
    /// `by_key` points at this exchange (not when another had the same hash).
    indexed: bool,
    key_hash: u64,
    started: Instant,
    deadline: Instant,
    /// First waiter (a list through [`Waiter::next`]).
    waiters: u16,
    /// Neighbours in the age list (live) or the next free slot (`next`, free).
    prev: u16,
    next: u16,
}

/// One client waiting for an exchange.
struct Waiter<T> {
    /// The client's header and question as sent (its ID, flags, case).
    head: Vec<u8>,
    edns: Option<Edns>,
    /// The caller's data (the client address, the `max_inflight` slot).
    token: Option<T>,
    /// Next waiter of the same exchange, or the next free slot.
    next: u16,
}

/// The exchanges one worker has in flight and the clients waiting for them:
/// fixed arrays, made once; nothing allocates after [`PendingTable::new`].
pub struct PendingTable<T> {
    exchanges: Box<[Exchange]>,
    waiters: Box<[Waiter<T>]>,
    /// Query ID → exchange.
    by_id: Box<[u16]>,
    /// Hash of the question key → exchange. Twice the room it needs, so that
    /// removals never make it grow (hashbrown then rehashes in place).
    by_key: HashMap<u64, u16>,
    hasher: RandomState,
    free_exchange: u16,
    free_waiter: u16,
    free_waiters: usize,
    /// Age list: oldest (nearest deadline) and newest exchange.
    oldest: u16,
    newest: u16,
    live: usize,
}

/// Why [`PendingTable::add`] did not take a question.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// Every exchange slot is in use.
    Exchanges,
    /// Every waiter slot is in use.
    Waiters,
}

/// What [`PendingTable::add`] did with a question.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Merged into the exchange in flight for the same question.
    Merged,
    /// A new exchange (this index): its request is to be sent.
    New(u16),
}

impl<T> PendingTable<T> {
    /// A table of `slots` exchanges (at most 4096) and twice as many waiters.
    pub fn new(slots: usize) -> Self {
        let slots = slots.clamp(1, 4096);
        let waiters = 2 * slots;
        let now = Instant::now();
        let exchanges = (0..slots)
            .map(|i| Exchange {
                live: false,
                id: 0,
                request: Vec::with_capacity(REQUEST_LEN),
                key: [0; MAX_KEY_LEN],
                key_len: 0,
                indexed: false,
                key_hash: 0,
                started: now,
                deadline: now,
                waiters: NONE,
                prev: NONE,
                next: if i + 1 < slots { (i + 1) as u16 } else { NONE },
            })
            .collect();
        let waiters_arr = (0..waiters)
            .map(|i| Waiter {
                head: Vec::with_capacity(HEAD_LEN),
                edns: None,
                token: None,
                next: if i + 1 < waiters { (i + 1) as u16 } else { NONE },
            })
            .collect();
        Self {
            exchanges,
            waiters: waiters_arr,
            by_id: vec![NONE; 1 << 16].into_boxed_slice(),
            by_key: HashMap::with_capacity(2 * slots),
            hasher: RandomState::new(),
            free_exchange: 0,
            free_waiter: 0,
            free_waiters: waiters,
            oldest: NONE,
            newest: NONE,
            live: 0,
        }
    }

    /// No exchange in flight.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Exchanges in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Takes `query` (whose cache key is `key`) for `token`: merged into the
    /// exchange in flight for the same question, or a new exchange with a
    /// fresh random ID whose request `build(id, buffer)` writes, due by
    /// `deadline`. `Err` gives the token back: the table is full.
    pub fn add(
        &mut self,
        query: &ParsedQuery<'_>,
        key: &[u8],
        token: T,
        now: Instant,
        deadline: Instant,
        build: impl FnOnce(u16, &mut Vec<u8>),
    ) -> Result<Added, (Full, T)> {
        if self.free_waiters == 0 {
            return Err((Full::Waiters, token));
        }
        let hash = self.hasher.hash_one(key);
        if let Some(&ex) = self.by_key.get(&hash) {
            let e = &self.exchanges[usize::from(ex)];
            if e.live && e.key[..e.key_len] == *key {
                self.push_waiter(ex, query, token);
                return Ok(Added::Merged);
            }
        }
        let ex = self.free_exchange;
        if ex == NONE {
            return Err((Full::Exchanges, token));
        }
        let id = loop {
            // At most 4096 of 65536 IDs are taken: a few draws at worst.
            let id: u16 = rand::random();
            if self.by_id[usize::from(id)] == NONE {
                break id;
            }
        };
        let indexed = !self.by_key.contains_key(&hash);
        if indexed {
            self.by_key.insert(hash, ex);
        }
        self.by_id[usize::from(id)] = ex;
        let newest = self.newest;
        let e = &mut self.exchanges[usize::from(ex)];
        self.free_exchange = e.next;
        e.live = true;
        e.id = id;
        build(id, &mut e.request);
        e.key[..key.len()].copy_from_slice(key);
        e.key_len = key.len();
        e.indexed = indexed;
        e.key_hash = hash;
        e.started = now;
        e.deadline = deadline;
        e.waiters = NONE;
        e.prev = newest;
        e.next = NONE;
        match newest {
            NONE => self.oldest = ex,
            n => self.exchanges[usize::from(n)].next = ex,
        }
        self.newest = ex;
        self.live += 1;
        self.push_waiter(ex, query, token);
        Ok(Added::New(ex))
    }

    fn push_waiter(&mut self, ex: u16, query: &ParsedQuery<'_>, token: T) {
        let w = self.free_waiter;
        let head = self.exchanges[usize::from(ex)].waiters;
        let waiter = &mut self.waiters[usize::from(w)];
        self.free_waiter = waiter.next;
        self.free_waiters -= 1;
        waiter.head.clear();
        waiter.head.extend_from_slice(&query.packet[..query.question_end]);
        waiter.edns = query.edns;
        waiter.token = Some(token);
        waiter.next = head;
        self.exchanges[usize::from(ex)].waiters = w;
    }

    /// The request sent for exchange `ex`.
    pub fn request(&self, ex: u16) -> &[u8] {
        &self.exchanges[usize::from(ex)].request
    }

    /// When exchange `ex` was started.
    pub fn started(&self, ex: u16) -> Instant {
        self.exchanges[usize::from(ex)].started
    }

    /// The exchange `resp` answers: its ID is in flight and it echoes that
    /// exchange's question byte for byte (0x20 case included). `None`: not an
    /// answer to anything we asked (late, stray or forged).
    pub fn answered_by(&self, resp: &[u8]) -> Option<u16> {
        let id = u16::from_be_bytes([*resp.first()?, *resp.get(1)?]);
        let ex = self.by_id[usize::from(id)];
        let e = self.exchanges.get(usize::from(ex))?;
        (e.live && wire::answers_question(&e.request, resp)).then_some(ex)
    }

    /// The oldest exchange, when its deadline has passed at `now`.
    pub fn expired(&self, now: Instant) -> Option<u16> {
        let e = self.exchanges.get(usize::from(self.oldest))?;
        (e.deadline <= now).then_some(self.oldest)
    }

    /// The oldest exchange.
    pub fn oldest(&self) -> Option<u16> {
        (self.oldest != NONE).then_some(self.oldest)
    }

    /// The nearest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.exchanges.get(usize::from(self.oldest)).map(|e| e.deadline)
    }

    /// Ends exchange `ex`: `each` gets every waiter's question (as the client
    /// sent it) and token; the slots are free again afterwards.
    pub fn finish(&mut self, ex: u16, mut each: impl FnMut(&ParsedQuery<'_>, T)) {
        let e = &mut self.exchanges[usize::from(ex)];
        if !e.live {
            return;
        }
        e.live = false;
        let (prev, next, id, mut w) = (e.prev, e.next, e.id, e.waiters);
        if e.indexed {
            self.by_key.remove(&e.key_hash);
        }
        e.waiters = NONE;
        self.by_id[usize::from(id)] = NONE;
        match prev {
            NONE => self.oldest = next,
            p => self.exchanges[usize::from(p)].next = next,
        }
        match next {
            NONE => self.newest = prev,
            n => self.exchanges[usize::from(n)].prev = prev,
        }
        self.exchanges[usize::from(ex)].next = self.free_exchange;
        self.free_exchange = ex;
        self.live -= 1;
        while w != NONE {
            let waiter = &mut self.waiters[usize::from(w)];
            let next_waiter = waiter.next;
            if let Some(token) = waiter.token.take() {
                each(&client_query(&waiter.head, waiter.edns), token);
            }
            waiter.next = self.free_waiter;
            self.free_waiter = w;
            self.free_waiters += 1;
            w = next_waiter;
        }
    }
}

/// The [`ParsedQuery`] of a client's header and question as kept by the table
/// (`head` holds exactly those bytes, as [`wire::parse_query`] accepted them).
pub fn client_query(head: &[u8], edns: Option<Edns>) -> ParsedQuery<'_> {
    let end = head.len();
    let u16_at = |at: usize| u16::from_be_bytes([head[at], head[at + 1]]);
    ParsedQuery {
        packet: head,
        id: u16_at(0),
        flags: u16_at(2),
        qname: &head[wire::HEADER_LEN..end - 4],
        qtype: u16_at(end - 4),
        qclass: u16_at(end - 2),
        question_end: end,
        edns,
    }
}

/// A waiting client: where its answer goes and its `max_inflight` slot.
pub struct Client {
    /// Its address, as `recvmmsg` gave it (for the worker's `sendmmsg`).
    raw: libc::sockaddr_storage,
    raw_len: libc::socklen_t,
    /// Where its answer goes out from (the address it asked, on a wildcard socket).
    from: ReplyFrom,
    /// The same address, for the task path.
    addr: SocketAddr,
    /// Released when the client is answered (or given up on).
    _slot: InflightSlot,
}

/// A worker's own Consul client: its socket, its pending table and buffers.
pub struct InlineConsul {
    socket: UdpSocket,
    received: RecvBatch<BATCH, ANSWER_SLOT>,
    /// The requests of [`Core::queued`], pointed at right before each send.
    requests: SendBatch<BATCH>,
    core: Core,
}

/// Everything but the receive batch (whose datagrams are borrowed while the
/// rest is updated).
struct Core {
    fd: RawFd,
    table: PendingTable<Client>,
    /// Exchanges whose requests go out with the next [`Core::send_queued`].
    queued: Vec<u16>,
    /// An answer made into a template, reused (capacity kept).
    wire: Vec<u8>,
    ttls: Vec<u16>,
    /// The first Consul address's share of `dns.consul_timeout`.
    attempt: Duration,
    engine: Arc<Engine>,
    slow: SlowPath,
    /// The worker's client socket: the task path answers on it.
    client_socket: Arc<UdpSocket>,
}

impl InlineConsul {
    /// The worker's Consul client, when the Consul forwarder's first address
    /// is one a worker may ask itself (loopback) and `slots` is not 0.
    pub fn new(
        engine: &Arc<Engine>,
        slow: &SlowPath,
        client_socket: &Arc<UdpSocket>,
        slots: usize,
    ) -> std::io::Result<Option<Self>> {
        let Some((addr, attempt)) = engine.consul().inline_target() else {
            return Ok(None);
        };
        if slots == 0 {
            return Ok(None);
        }
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::DGRAM.nonblocking(),
            Some(Protocol::UDP),
        )?;
        // Answers come in bursts while the worker answers clients.
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(1 << 20);
        // Connected: the kernel takes datagrams from that address only and
        // reports an ICMP port unreachable as ECONNREFUSED.
        socket.connect(&addr.into())?;
        let socket: UdpSocket = socket.into();
        Ok(Some(Self {
            core: Core {
                fd: socket.as_raw_fd(),
                table: PendingTable::new(slots),
                queued: Vec::with_capacity(BATCH),
                wire: Vec::with_capacity(ANSWER_SLOT),
                ttls: Vec::with_capacity(256),
                attempt,
                engine: engine.clone(),
                slow: slow.clone(),
                client_socket: client_socket.clone(),
            },
            socket,
            received: RecvBatch::default(),
            requests: SendBatch::default(),
        }))
    }

    /// No question of this worker's on the wire.
    pub fn idle(&self) -> bool {
        self.core.table.is_empty()
    }

    /// Takes the Consul question `query` from the client at `raw` (`addr`):
    /// `false` leaves it to the caller (the task path).
    pub fn ask(
        &mut self,
        query: &ParsedQuery<'_>,
        raw: (&libc::sockaddr_storage, libc::socklen_t),
        addr: SocketAddr,
        from: ReplyFrom,
        now: Instant,
        outbox: &mut Outbox,
    ) -> bool {
        let core = &mut self.core;
        let consul = core.engine.consul();
        if !consul.inline_now() {
            return false;
        }
        let stats = consul.stats();
        let Some(slot) = core.engine.admit() else {
            return true; // dropped and counted, as on the task path
        };
        let mut key_buf = [0u8; MAX_KEY_LEN];
        let key = query.key(&mut key_buf);
        // A forwarder slot is only needed for a new exchange; taken up front
        // and given back when the question is merged (rare under load: the
        // slot counter is shared with the other workers).
        let mut slot_taken = false;
        let client = Client {
            raw: *raw.0,
            raw_len: raw.1,
            from,
            addr,
            _slot: slot,
        };
        let result = core
            .table
            .add(query, key, client, now, now + core.attempt, |id, request| {
                slot_taken = consul.take_slot();
                wire::upstream_query(query, id, false, CONSUL_PAYLOAD, request);
            });
        match result {
            Ok(Added::Merged) => true,
            Ok(Added::New(ex)) => {
                if !slot_taken {
                    // Over `max_forwarded`: SERVFAIL at once, as the task path does.
                    stats.over_limit.fetch_add(1, Ordering::Relaxed);
                    let error = consul.busy();
                    core.fail_now(ex, &error, outbox);
                    return true;
                }
                stats.inline_exchanges.fetch_add(1, Ordering::Relaxed);
                core.queued.push(ex);
                if core.queued.len() == BATCH {
                    core.send_queued(&mut self.requests, outbox);
                }
                true
            }
            Err(_) => {
                stats.inline_overflow.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Sends the requests of the exchanges started since the last call.
    pub fn send_queued(&mut self, outbox: &mut Outbox) {
        self.core.send_queued(&mut self.requests, outbox);
    }

    /// Takes the answers Consul has sent (without waiting) and finishes their
    /// questions into `outbox`; returns how many datagrams came.
    pub fn receive(&mut self, outbox: &mut Outbox) -> usize {
        let n = match self.received.try_recv(self.socket.as_raw_fd()) {
            Ok(n) => n,
            Err(e) => {
                let cause = ExchangeError::io("receive", e);
                if !matches!(cause, ExchangeError::Refused) {
                    return 0;
                }
                // ICMP port unreachable: nothing listens at that address;
                // every question on this socket went there.
                self.core.fail_all(&cause, outbox);
                return 1;
            }
        };
        for i in 0..n {
            let Some((resp, cut)) = self.received.get_cut(i) else {
                continue;
            };
            match self.core.table.answered_by(resp) {
                Some(ex) => self.core.answered(ex, resp, cut, outbox),
                None => {
                    let stats = self.core.engine.consul().stats();
                    stats.ignored_responses.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        n
    }

    /// Gives up on the exchanges whose deadline has passed at `now`.
    pub fn expire(&mut self, now: Instant, outbox: &mut Outbox) {
        while let Some(ex) = self.core.table.expired(now) {
            self.core.failed(ex, &ExchangeError::Timeout, outbox);
        }
    }

    /// Waits until the client socket `client_fd` or the Consul socket has
    /// something, the nearest deadline passes, or `longest` has passed.
    pub fn wait(&self, client_fd: RawFd, now: Instant, longest: Duration) {
        let timeout = self
            .core
            .table
            .next_deadline()
            .map_or(longest, |d| d.saturating_duration_since(now).min(longest));
        // Rounded up: waking before the deadline would only spin.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut fds = [
            libc::pollfd {
                fd: client_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.core.fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd for the whole call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
}

impl Core {
    /// Sends the requests of the [`Core::queued`] exchanges with `requests`.
    fn send_queued(&mut self, requests: &mut SendBatch<BATCH>, outbox: &mut Outbox) {
        let count = self.queued.len();
        for (i, &ex) in self.queued.iter().enumerate() {
            // Connected: no destination address.
            requests.set(i, self.table.request(ex), None);
        }
        // SAFETY: messages [0, count) point at the requests of live exchanges,
        // set just above; a failed one keeps its buffer until its slot is
        // reused, which nothing in `on_error` does.
        unsafe {
            requests.send(self.fd, count, |i, error| {
                let cause = ExchangeError::io("send", error);
                if matches!(cause, ExchangeError::Refused) {
                    // An ICMP error from an earlier request: the agent is gone.
                    self.fail_all(&cause, outbox);
                    return OnSendError::Stop;
                }
                let ex = self.queued[i];
                self.failed(ex, &cause, outbox);
                OnSendError::Skip
            });
        }
        self.queued.clear();
    }

    /// Every exchange failed with `cause`.
    fn fail_all(&mut self, cause: &ExchangeError, outbox: &mut Outbox) {
        self.queued.clear();
        while let Some(ex) = self.table.oldest() {
            self.failed(ex, cause, outbox);
        }
    }

    /// Consul answered exchange `ex` with `resp` (`cut`: larger than our buffer).
    fn answered(&mut self, ex: u16, resp: &[u8], cut: bool, outbox: &mut Outbox) {
        if cut || wire::is_truncated(resp) {
            self.hand_over(ex, FirstTry::Truncated);
            return;
        }
        let Some(meta) = wire::make_template_into(resp, &mut self.wire, &mut self.ttls) else {
            self.failed(ex, &ExchangeError::Malformed, outbox);
            return;
        };
        let failure = matches!(meta.rcode, rcode::SERVFAIL | rcode::REFUSED);
        self.engine.consul().inline_answered(failure);
        if failure
            && self.engine.consul().has_fallback()
            && let Some(template) = wire::make_template(resp)
        {
            self.hand_over(ex, FirstTry::FailureAnswer(template));
            return;
        }
        let stats = self.engine.consul().stats();
        stats.upstream_latency(self.table.started(ex).elapsed());
        let (wire, ttls) = (&self.wire, &self.ttls);
        self.table.finish(ex, |query, client| {
            let out = outbox.buf();
            wire::finish_parts(
                wire,
                ttls,
                query,
                TtlRewrite::Keep,
                query.response_limit(Transport::Udp),
                out,
            );
            stats.answered(meta.rcode);
            outbox.push(&client.raw, client.raw_len, client.from);
        });
        self.engine.consul().release_slot();
    }

    /// Exchange `ex` failed with the first Consul address: SERVFAIL when there
    /// is no other, else on to the others in a task.
    fn failed(&mut self, ex: u16, cause: &ExchangeError, outbox: &mut Outbox) {
        match self.engine.consul().inline_failed(cause) {
            Some(error) => {
                let stats = self.engine.consul().stats();
                stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                self.fail_now(ex, &error, outbox);
                self.engine.consul().release_slot();
            }
            None => self.hand_over(ex, FirstTry::Failed(cause.clone())),
        }
    }

    /// Answers every waiter of `ex` SERVFAIL for `error` (logged, rate-limited).
    fn fail_now(&mut self, ex: u16, error: &ForwardError, outbox: &mut Outbox) {
        let engine = &self.engine;
        let mut logged = false;
        self.table.finish(ex, |query, client| {
            if !logged {
                engine.consul().log_failure(error, query);
                logged = true;
            }
            let out = outbox.buf();
            engine
                .consul()
                .finish(&Err(error.clone()), query, query.response_limit(Transport::Udp), out);
            outbox.push(&client.raw, client.raw_len, client.from);
        });
    }

    /// Hands exchange `ex` (with its forwarder slot) to a task that goes on
    /// with `first` and answers its waiters on the client socket. The rare
    /// path: it copies the questions.
    fn hand_over(&mut self, ex: u16, first: FirstTry) {
        let started = self.table.started(ex);
        let mut waiters: Vec<(Vec<u8>, Option<Edns>, Client)> = Vec::new();
        self.table.finish(ex, |query, client| {
            waiters.push((query.packet.to_vec(), query.edns, client));
        });
        let Some((head, edns, _)) = waiters.first() else {
            self.engine.consul().release_slot();
            return;
        };
        let (head, edns) = (head.clone(), *edns);
        let engine = self.engine.clone();
        let socket = self.client_socket.clone();
        self.slow.spawn(async move {
            let query = client_query(&head, edns);
            let result = engine.consul().resolve_after(&query, started, first).await;
            let mut out = Vec::with_capacity(512);
            for (head, edns, client) in &waiters {
                let query = client_query(head, *edns);
                engine
                    .consul()
                    .finish(&result, &query, query.response_limit(Transport::Udp), &mut out);
                let _ = crate::net::udp_batch::send_from(socket.as_raw_fd(), &out, client.addr, client.from);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query packet for `name` (wire form built from dotted text) with `id`.
    fn packet(name: &str, qtype: u16, id: u16, edns: bool) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            p.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0x80, 0, 0, 0]);
        }
        p
    }

    /// Adds `pkt`'s question; returns the result and the request built.
    fn add(
        table: &mut PendingTable<u32>,
        pkt: &[u8],
        token: u32,
        now: Instant,
        limit: Duration,
    ) -> (Result<Added, (Full, u32)>, Vec<u8>) {
        let q = wire::parse_query(pkt).unwrap();
        let mut key_buf = [0u8; MAX_KEY_LEN];
        let key = q.key(&mut key_buf);
        let mut request = Vec::new();
        let r = table.add(&q, key, token, now, now + limit, |id, buf| {
            wire::upstream_query(&q, id, false, CONSUL_PAYLOAD, buf);
            request = buf.clone();
        });
        (r, request)
    }

    /// The response a server would send to `request`.
    fn answer_to(request: &[u8]) -> Vec<u8> {
        let mut resp = request.to_vec();
        resp[2] |= 0x80;
        resp
    }

    fn drain(table: &mut PendingTable<u32>, ex: u16) -> Vec<(u32, u16, String)> {
        let mut got = Vec::new();
        table.finish(ex, |q, token| got.push((token, q.id, wire::name_to_string(q.qname))));
        got.sort();
        got
    }

    /// The table is bounded: `slots` exchanges and twice as many waiters;
    /// a full table gives the token back, and freed slots are used again.
    #[test]
    fn the_table_is_bounded_and_slots_are_reused() {
        let now = Instant::now();
        let limit = Duration::from_secs(2);
        let mut table = PendingTable::<u32>::new(4);
        let mut exchanges = Vec::new();
        for i in 0..4u32 {
            let (r, _) = add(
                &mut table,
                &packet(&format!("s{i}.service.consul"), 1, i as u16, false),
                i,
                now,
                limit,
            );
            let Ok(Added::New(ex)) = r else { panic!("{r:?}") };
            exchanges.push(ex);
        }
        assert_eq!(table.len(), 4);
        let (r, _) = add(&mut table, &packet("s9.service.consul", 1, 9, false), 9, now, limit);
        assert_eq!(r.unwrap_err(), (Full::Exchanges, 9));
        // Identical questions (in any case) merge into the exchange in flight,
        // up to the waiter bound (8 = 2 x 4, 4 taken).
        for i in 10..14u32 {
            let (r, _) = add(
                &mut table,
                &packet("S0.Service.CONSUL", 1, i as u16, false),
                i,
                now,
                limit,
            );
            assert_eq!(r.unwrap(), Added::Merged);
        }
        let (r, _) = add(&mut table, &packet("s0.service.consul", 1, 14, false), 14, now, limit);
        assert_eq!(r.unwrap_err(), (Full::Waiters, 14));
        // Another type is another question.
        let got = drain(&mut table, exchanges[0]);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], (0, 0, "s0.service.consul.".into()));
        assert_eq!(
            got[1],
            (10, 10, "S0.Service.CONSUL.".into()),
            "each waiter keeps its ID and case"
        );
        assert_eq!(table.len(), 3);
        let (r, _) = add(&mut table, &packet("s0.service.consul", 33, 20, false), 20, now, limit);
        assert!(matches!(r, Ok(Added::New(_))), "{r:?}");
        for &ex in &exchanges[1..] {
            assert_eq!(drain(&mut table, ex).len(), 1);
        }
        // Finishing twice is harmless.
        assert!(drain(&mut table, exchanges[1]).is_empty());
        assert_eq!(table.len(), 1);
    }

    /// Deadlines: the oldest exchange expires first, a finished one never.
    #[test]
    fn exchanges_expire_oldest_first() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(100);
        let mut table = PendingTable::<u32>::new(8);
        let mut ids = Vec::new();
        for i in 0..3u32 {
            let at = t0 + Duration::from_millis(10 * u64::from(i));
            let (r, _) = add(&mut table, &packet(&format!("e{i}.consul"), 1, 1, false), i, at, limit);
            let Ok(Added::New(ex)) = r else { panic!() };
            ids.push(ex);
        }
        assert_eq!(table.next_deadline(), Some(t0 + limit));
        assert_eq!(table.expired(t0 + Duration::from_millis(99)), None);
        assert_eq!(table.expired(t0 + limit), Some(ids[0]));
        // The middle one is answered: the age list skips it.
        drain(&mut table, ids[1]);
        drain(&mut table, ids[0]);
        assert_eq!(table.next_deadline(), Some(t0 + Duration::from_millis(120)));
        assert_eq!(table.expired(t0 + Duration::from_millis(119)), None);
        assert_eq!(table.expired(t0 + Duration::from_millis(500)), Some(ids[2]));
        drain(&mut table, ids[2]);
        assert_eq!(table.expired(t0 + Duration::from_secs(9)), None);
        assert!(table.is_empty() && table.next_deadline().is_none());
    }

    /// Only the answer to an exchange's own request is taken: a wrong ID, the
    /// question in another case or another question, a query instead of a
    /// response, a runt, or an answer to a finished exchange are not.
    #[test]
    fn only_the_exact_answer_matches() {
        let now = Instant::now();
        let mut table = PendingTable::<u32>::new(8);
        let long = "abcdefghijklmnopqrstuvwxyz.abcdefghijklmnopqrstuvwxyz.service.consul";
        let (r, request) = add(&mut table, &packet(long, 1, 7, true), 7, now, Duration::from_secs(1));
        let Ok(Added::New(ex)) = r else { panic!() };
        let resp = answer_to(&request);
        assert_eq!(table.answered_by(&resp), Some(ex));
        let mut wrong_id = resp.clone();
        wrong_id[1] ^= 1;
        assert_eq!(table.answered_by(&wrong_id), None);
        let mut wrong_case = resp.clone();
        wrong_case[wire::HEADER_LEN + 1] ^= 0x20;
        assert_eq!(table.answered_by(&wrong_case), None);
        let mut wrong_type = resp.clone();
        let at = wire::skip_name(&resp, wire::HEADER_LEN).unwrap();
        wrong_type[at + 1] = 28;
        assert_eq!(table.answered_by(&wrong_type), None);
        assert_eq!(table.answered_by(&request), None, "a query is not an answer");
        assert_eq!(table.answered_by(&resp[..1]), None);
        assert_eq!(table.answered_by(&[]), None);
        let got = drain(&mut table, ex);
        assert_eq!(got, [(7, 7, format!("{long}."))]);
        assert_eq!(table.answered_by(&resp), None, "late: the exchange is over");
    }

    /// IDs are random and unique among the exchanges in flight.
    #[test]
    fn ids_are_unique_in_flight() {
        let now = Instant::now();
        let mut table = PendingTable::<u32>::new(4096);
        let mut ids = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let (r, request) = add(
                &mut table,
                &packet(&format!("n{i}.consul"), 1, 0, false),
                i,
                now,
                Duration::from_secs(1),
            );
            assert!(matches!(r, Ok(Added::New(_))));
            assert!(ids.insert(u16::from_be_bytes([request[0], request[1]])));
        }
    }

    /// A client's question keeps what `wire::finish` needs: ID, flags, case, EDNS.
    #[test]
    fn the_client_query_round_trips() {
        let pkt = packet("Web.Service.Consul", 33, 0xBEEF, true);
        let q = wire::parse_query(&pkt).unwrap();
        let head = &pkt[..q.question_end];
        let back = client_query(head, q.edns);
        assert_eq!(
            (back.id, back.flags, back.qtype, back.qclass),
            (q.id, q.flags, q.qtype, q.qclass)
        );
        assert_eq!(back.qname, q.qname);
        assert_eq!(back.edns, q.edns);
        assert_eq!(back.question_end, head.len());
    }

    /// The worker's Consul socket is connected: the kernel delivers only the
    /// server's datagrams; one from any other source never reaches the table.
    #[test]
    fn a_datagram_from_another_source_is_not_received() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        socket.connect(&server.local_addr().unwrap().into()).unwrap();
        let socket: UdpSocket = socket.into();
        let ours = socket.local_addr().unwrap();
        let spoofer = UdpSocket::bind("127.0.0.1:0").unwrap();
        spoofer.send_to(b"forged", ours).unwrap();
        server.send_to(b"real", ours).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = RecvBatch::<4, 64>::default();
        let n = batch.recv(socket.as_raw_fd());
        assert_eq!(n, 1);
        assert_eq!(batch.get_cut(0), Some((&b"real"[..], false)));
        assert_eq!(
            batch.try_recv(socket.as_raw_fd()).unwrap(),
            0,
            "the forged datagram was dropped"
        );
    }
}
