//! The vpn as a component of the appliance (see [`crate::component`]): bound
//! from its own section, run by [`super::run`], and shown by itself: its
//! Prometheus series, its part of `/api/status` and of the status page, its
//! banner line, and its admin actions (add and remove peers).
//!
//! ```text
//!  Vpn (one per process: the VpnState loaded at the first bind and kept, so
//!       laptops keep their sessions across restarts)
//!    bind() ─▶ VpnState (key, peers) + VpnSockets (UDP socket, TUN interface)
//!    BoundVpn::run ─▶ vpn::run(section, sockets, state)
//!    /api/vpn/peers ─▶ admin::add / admin::remove
//!    metrics / sample ◀── VpnState::peers (per scrape; once per timeline step)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwapOption;
use http::{Method, StatusCode};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::admin::{self, NewPeerAnswer, PeerRefusal, VpnPeerReport, VpnReport, refuse};
use super::settings::VpnConfig;
use super::{ClientInputs, NewPeer, VpnError, VpnSockets, VpnState, page};
use crate::component::{
    ApiAnswer, ApiRequest, Appliance, Banner, Bound, BoxFuture, Component, ComponentError, Failure, Host, Listener,
    Listening, PageParts,
};
use crate::config::shared::ConfigError;
use crate::report::html::refusal_page;
use crate::report::prometheus::{Kind, Writer};
use crate::report::timeline::{Chart, Tick, TopK};

/// Chart: tunnel payload per second, per busiest peer and direction.
static BYTES: Chart = Chart {
    order: 60,
    id: "vpn-bytes",
    title: "vpn payload (rx/tx per peer)",
    unit: "B/s",
};
/// Chart: time since each peer's latest handshake.
static HANDSHAKE_AGE: Chart = Chart {
    order: 61,
    id: "vpn-handshake",
    title: "vpn handshake age per peer",
    unit: "s",
};
/// Peers charted one by one (the most bytes since start).
const CHARTED_PEERS: usize = 8;

impl Failure for VpnError {
    fn exit_code(&self) -> u8 {
        match self {
            VpnError::Bind { .. } | VpnError::State { .. } | VpnError::NoEndpoint(_) | VpnError::NoNft => {
                crate::EXIT_CONFIG
            }
            _ => 1,
        }
    }
}

/// The vpn component.
pub struct Vpn {
    config: Mutex<VpnConfig>,
    inputs: ClientInputs,
    /// Keys, peers and their sessions: loaded at the first bind, kept.
    state: Arc<ArcSwapOption<VpnState>>,
    /// A run is going on.
    running: Arc<AtomicBool>,
    bound: Mutex<Option<SocketAddr>>,
}

impl Vpn {
    /// The vpn of `config`; client configs made from `inputs`.
    pub fn new(config: VpnConfig, inputs: ClientInputs) -> Self {
        Self {
            config: Mutex::new(config),
            inputs,
            state: Arc::new(ArcSwapOption::empty()),
            running: Arc::new(AtomicBool::new(false)),
            bound: Mutex::new(None),
        }
    }

    /// Its section (with the bound port once started).
    pub fn config(&self) -> VpnConfig {
        self.config.lock().clone()
    }

    /// The state of the last start (it outlives the run).
    pub fn running_state(&self) -> Option<Arc<VpnState>> {
        self.state.load_full()
    }

    /// A run is going on now.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Where WireGuard listens, once bound.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        *self.bound.lock()
    }

    /// The `host:port` client configs dial.
    pub fn client_endpoint(&self) -> Result<String, ConfigError> {
        super::client_endpoint(&self.config(), &self.inputs)
    }

    /// Adds a client peer to `state` (see [`super::add_client`]).
    pub fn add_client(&self, state: &VpnState, name: &str) -> Result<NewPeer, VpnError> {
        super::add_client(&self.config(), &self.inputs, state, name)
    }
}

struct BoundVpn {
    sockets: VpnSockets,
    state: Arc<VpnState>,
    config: VpnConfig,
    running: Arc<AtomicBool>,
}

/// Clears the running flag however a run ends.
struct RunningFlag(Arc<AtomicBool>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

fn listening(addr: Option<SocketAddr>) -> Listening {
    Listening(
        addr.map(|addr| Listener {
            key: "vpn",
            what: "vpn",
            addr,
            tcp: false,
            list: false,
        })
        .into_iter()
        .collect(),
    )
}

impl Bound for BoundVpn {
    fn listening(&self) -> Listening {
        listening(self.sockets.local_addr())
    }

    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, Result<(), ComponentError>> {
        Box::pin(async move {
            let BoundVpn {
                sockets,
                state,
                config,
                running,
            } = *self;
            running.store(true, Ordering::Relaxed);
            let _flag = RunningFlag(running);
            super::run(&config, sockets, state, shutdown)
                .await
                .map_err(ComponentError::from)
        })
    }
}

impl Component for Vpn {
    fn name(&self) -> &'static str {
        "vpn"
    }

    // The state first: an unusable key file is reported before a TUN exists.
    fn bind(&self) -> Result<Box<dyn Bound>, ComponentError> {
        let mut config = self.config.lock();
        let state = match self.state.load_full() {
            Some(s) => s,
            None => {
                let s = VpnState::new(&config)?;
                self.state.store(Some(s.clone()));
                s
            }
        };
        let sockets = VpnSockets::bind(&config)?;
        if let Some(addr) = sockets.local_addr() {
            config.listen = addr;
            *self.bound.lock() = Some(addr);
        }
        Ok(Box::new(BoundVpn {
            sockets,
            state,
            config: config.clone(),
            running: self.running.clone(),
        }))
    }

    fn listening(&self) -> Listening {
        listening(self.listen_addr())
    }

    fn metrics(&self, out: &mut Writer) {
        if let Some(state) = self.running_state() {
            metrics(out, &state);
        }
    }

    fn sample(&self, tick: &mut Tick<'_>) {
        let Some(state) = self.running_state() else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut busiest = TopK::<super::PeerStatus, CHARTED_PEERS>::default();
        for p in state.peers() {
            // +1: a peer without traffic yet still shows its handshake age.
            busiest.offer(p.rx_bytes + p.tx_bytes + 1, p);
        }
        for (_, p) in busiest.into_sorted() {
            tick.counter(&BYTES, &format!("{} rx", p.name), p.rx_bytes);
            tick.counter(&BYTES, &format!("{} tx", p.name), p.tx_bytes);
            // `last_handshake` is a Unix time.
            if let Some(at) = p.last_handshake {
                tick.gauge(&HANDSHAKE_AGE, &p.name, now.saturating_sub(at).as_secs_f64());
            }
        }
    }

    fn status(&self, started: bool) -> serde_json::Value {
        serde_json::to_value(report(self, started)).unwrap_or_default()
    }

    fn page(&self, started: bool, q: &str, parts: &mut PageParts) {
        if let Some(v) = self.listen_addr().filter(|_| started) {
            parts.listening.push(format!("vpn <code>{v}</code> (udp, WireGuard)"));
        }
        page::section(&mut parts.sections, &report(self, started), q);
    }

    fn banner(&self, appliance: &Appliance, host: &Host, banner: &mut Banner) {
        let Some(v) = self.listen_addr() else {
            return;
        };
        let config = self.config();
        banner.places.push(format!(
            "  vpn      udp {} (WireGuard), tunnel {} on {}",
            appliance.reachable(v),
            config.address,
            config.interface
        ));
        banner.tries.push(match host.admin {
            Some(admin) => format!(
                "  curl -X POST -d '{{\"name\":\"laptop\"}}' http://{admin}/api/vpn/peers   # a WireGuard client config"
            ),
            None => format!("  wayfinder vpn peer add laptop --qr -c {}", host.source),
        });
    }

    fn api<'a>(&'a self, req: ApiRequest<'a>) -> BoxFuture<'a, Option<ApiAnswer>> {
        Box::pin(async move {
            match (req.method, req.path) {
                (&Method::POST, ["peers"]) => {
                    let is_form = req.is_form && !admin::is_json_object(req.body);
                    Some(match (add(self, req.started, req.body, is_form), is_form) {
                        (Ok(answer), false) => {
                            ApiAnswer::Json(StatusCode::CREATED, serde_json::to_value(answer).unwrap_or_default())
                        }
                        (Ok(answer), true) => ApiAnswer::Html(
                            StatusCode::CREATED,
                            page::new_peer(&self.config().interface, &answer, req.page_query),
                        ),
                        (Err(r), false) => ApiAnswer::Json(r.status, serde_json::json!({ "error": r.message })),
                        (Err(r), true) => ApiAnswer::Html(r.status, refusal_page(&r.message, req.page_query)),
                    })
                }
                (&Method::DELETE, ["peers", name]) | (&Method::POST, ["peers", name, "remove"]) => {
                    Some(match (remove(self, req.started, name), req.is_form) {
                        (Ok(()), _) => ApiAnswer::Done(
                            StatusCode::OK,
                            serde_json::json!({ "ok": true, "peer": name, "action": "remove" }),
                        ),
                        (Err(r), false) => ApiAnswer::Json(r.status, serde_json::json!({ "error": r.message })),
                        (Err(r), true) => ApiAnswer::Html(r.status, refusal_page(&r.message, req.page_query)),
                    })
                }
                _ => None,
            }
        })
    }
}

/// The vpn part of the status report; `started`: the plan starts it here.
fn report(vpn: &Vpn, started: bool) -> VpnReport {
    let config = vpn.config();
    let vpn_state = vpn.running_state().filter(|_| started);
    VpnReport {
        available: started,
        running: started && vpn.is_running(),
        interface: config.interface.clone(),
        address: config.address.to_string(),
        listen: vpn.listen_addr(),
        endpoint: vpn.client_endpoint().ok(),
        public_key: vpn_state.as_ref().map(|v| v.public_key()),
        peers: vpn_state
            .map(|v| {
                v.peers()
                    .into_iter()
                    .map(|p| VpnPeerReport {
                        name: p.name,
                        address: p.address,
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        latest_handshake: p.last_handshake.map(|t| t.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                        handshakes: p.handshakes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The vpn this action works on: enabled on this host and running.
fn usable(vpn: &Vpn, started: bool) -> Result<std::sync::Arc<VpnState>, PeerRefusal> {
    if !started {
        return Err(refuse(
            StatusCode::CONFLICT,
            "the vpn is not enabled on this host: set `enabled = true` in the [vpn] section \
             of the config (vpn.enabled = true) or START_VPN=true, then restart wayfinder up",
        ));
    }
    match vpn.running_state().filter(|_| vpn.is_running()) {
        Some(v) => Ok(v),
        None => Err(refuse(
            StatusCode::CONFLICT,
            "the vpn is not running; see GET /api/units for its state and how it last ended",
        )),
    }
}

/// Adds the peer named in `body` (JSON, or a form when `is_form`) to the
/// running vpn. Whether the vpn can take one is checked first: that is the
/// answer that matters to someone whose vpn is off.
fn add(vpn: &Vpn, started: bool, body: &[u8], is_form: bool) -> Result<NewPeerAnswer, PeerRefusal> {
    let vpn_state = usable(vpn, started)?;
    let name = admin::peer_name(body, is_form)?;
    let name = name.as_str();
    if vpn_state.table().entries().iter().any(|e| e.record.name == name) {
        return Err(refuse(
            StatusCode::CONFLICT,
            format!("a peer named `{name}` exists already; remove it first or pick another name"),
        ));
    }
    let added = vpn.add_client(&vpn_state, name).map_err(|e| match e {
        VpnError::NoEndpoint(c) => refuse(
            StatusCode::CONFLICT,
            format!(
                "no endpoint configured for client configs: {}; restart wayfinder up after setting it",
                c.problem
            ),
        ),
        // Duplicates raced past the check above, the subnet is full ...
        VpnError::Peer(p) => refuse(StatusCode::CONFLICT, p),
        other => refuse(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    let config = added.client.render();
    let qr_svg =
        super::client::qr_svg(&config).map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::info!(
        peer = %added.record.name,
        address = %added.record.address,
        public_key = %added.record.public_key,
        "vpn peer added through the admin endpoint"
    );
    Ok(NewPeerAnswer {
        ok: true,
        name: added.record.name,
        address: added.record.address,
        public_key: added.record.public_key,
        config,
        qr_svg,
    })
}

/// Removes peer `name` (or the peer with that public key) from the running vpn;
/// its sessions end at once.
fn remove(vpn: &Vpn, started: bool, name: &str) -> Result<(), PeerRefusal> {
    let vpn_state = usable(vpn, started)?;
    match vpn_state.remove_peer(name) {
        Ok(true) => {
            tracing::info!(peer = %name, "vpn peer removed through the admin endpoint");
            Ok(())
        }
        Ok(false) => Err(refuse(
            StatusCode::NOT_FOUND,
            format!("there is no peer named `{name}`; see GET /api/status for the peers"),
        )),
        Err(e) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// The vpn's Prometheus series.
fn metrics(out: &mut Writer, state: &VpnState) {
    let peers = state.peers();
    out.single(
        "wayfinder_vpn_peers",
        Kind::Gauge,
        "Peers configured on the vpn.",
        peers.len(),
    );
    out.single(
        "wayfinder_vpn_peer_capacity",
        Kind::Gauge,
        "Peers the tunnel subnet has addresses for (vpn.address's prefix, less the appliance's own).",
        state.peer_capacity(),
    );
    out.family(
        "wayfinder_vpn_last_handshake_timestamp_seconds",
        Kind::Gauge,
        "Unix time of each peer's latest handshake (absent before the first).",
    );
    for p in &peers {
        if let Some(t) = p.last_handshake {
            out.sample(
                "wayfinder_vpn_last_handshake_timestamp_seconds",
                &[("peer", &p.name)],
                t.as_secs(),
            );
        }
    }
    out.family(
        "wayfinder_vpn_handshakes_total",
        Kind::Counter,
        "Handshakes completed with each peer.",
    );
    for p in &peers {
        out.sample("wayfinder_vpn_handshakes_total", &[("peer", &p.name)], p.handshakes);
    }
    for (name, help, bytes) in [
        (
            "wayfinder_vpn_received_bytes_total",
            "Payload bytes received from each peer through the tunnel.",
            &(|p: &super::PeerStatus| p.rx_bytes) as &dyn Fn(&super::PeerStatus) -> u64,
        ),
        (
            "wayfinder_vpn_sent_bytes_total",
            "Payload bytes sent to each peer through the tunnel.",
            &|p: &super::PeerStatus| p.tx_bytes,
        ),
    ] {
        out.family(name, Kind::Counter, help);
        for p in &peers {
            out.sample(name, &[("peer", &p.name)], bytes(p));
        }
    }
    out.family(
        "wayfinder_vpn_spoofed_packets_total",
        Kind::Counter,
        "Packets dropped because their inner source address was not the sending peer's.",
    );
    for p in &peers {
        out.sample(
            "wayfinder_vpn_spoofed_packets_total",
            &[("peer", &p.name)],
            p.spoofed_drops,
        );
    }
    out.single(
        "wayfinder_vpn_cookie_replies_total",
        Kind::Counter,
        "Cookie replies sent because handshakes came faster than the limit.",
        state.cookies_sent.load(Ordering::Relaxed),
    );
}
