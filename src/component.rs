//! The seam between `wayfinder up` (or a one-component command such as
//! `wayfinder dns`) and a component: how it is bound, run, restarted, and
//! shown. The supervisor and the admin endpoint know components only through
//! this module; a component knows the appliance only through [`Appliance`].
//!
//! ```text
//!  components::build(kind, &Config, Arc<Appliance>) ─▶ Arc<dyn Component>   (once per process)
//!  Component::bind() ─▶ Box<dyn Bound>          listeners, TUN, state: a clash = exit 64 at start
//!  Bound::listening() ─▶ Appliance::listened    every component learns the others' real ports
//!  Bound::run(shutdown) ─▶ Result<(), ComponentError>      until cancelled; Err / early Ok = restart
//!  Component::metrics / status / page / banner             what it shows (per scrape, per view)
//!  Component::sample                                        its chart points (once per timeline::STEP)
//!  Component::ready                                         running and doing its job? (/api/ready)
//!  Component::api / reload                                  /api/<name>/..., SIGHUP
//! ```
//!
//! To add a component: a folder of its own with a type implementing
//! [`Component`] (and its `settings` section), one variant in
//! `components::ComponentKind` with its facts and constructor, and one
//! section in `config`. Nothing in `supervisor/` changes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::consul::ConsulHub;
use crate::consul::settings::ConsulConfig;
use crate::net::listeners::OwnListeners;
use crate::report::prometheus;
use crate::report::timeline::Tick;

/// A boxed future, for the object-safe methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a component could not bind or stopped running: its own typed error,
/// with the exit status it means for a one-component command.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ComponentError {
    /// 64: configuration (an address that cannot be bound, unusable files);
    /// 70: a bug (a dead worker thread); 1: anything a restart may mend.
    pub exit_code: u8,
    /// The component's own error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A component's error enum says which exit status each of its failures means.
pub trait Failure: std::error::Error + Send + Sync + Sized + 'static {
    /// 64 (configuration), 70 (a bug) or 1 (restartable).
    fn exit_code(&self) -> u8;
}

impl<E: Failure> From<E> for ComponentError {
    fn from(error: E) -> Self {
        Self {
            exit_code: error.exit_code(),
            source: Box::new(error),
        }
    }
}

/// What every component may know of the appliance besides its own section:
/// the process's access to Consul, this host's address, and where the
/// appliance itself listens (so a Consul registration never makes a component
/// reach its own control plane). One per process, shared by all components.
pub struct Appliance {
    /// The process's access to Consul (its views outlive component restarts).
    pub consul: Arc<ConsulHub>,
    /// Stops the hub's views (see [`Appliance::close`]).
    consul_stop: CancellationToken,
    /// This host's address (`HOST_IP`, given or guessed), when known.
    pub host_ip: Option<IpAddr>,
    /// The appliance's TCP listeners: those configured, plus those really
    /// bound (a port 0 in the file), as components report them.
    own: Mutex<OwnListeners>,
}

impl Appliance {
    /// The appliance with Consul as `consul` says and the listeners its
    /// configuration names.
    pub fn new(consul: &ConsulConfig, host_ip: Option<IpAddr>, own: OwnListeners) -> Arc<Self> {
        let consul_stop = CancellationToken::new();
        Arc::new(Self {
            consul: ConsulHub::new(consul.http, consul.resync, &consul_stop),
            consul_stop,
            host_ip,
            own: Mutex::new(own),
        })
    }

    /// Stops the Consul views once nothing uses them any more.
    pub async fn close(&self) {
        self.consul_stop.cancel();
        self.consul.close().await;
    }

    /// The appliance's own listeners as known now.
    pub fn own_listeners(&self) -> OwnListeners {
        self.own.lock().clone()
    }

    /// Records listeners a component has bound.
    pub fn listened(&self, listening: &Listening) {
        let mut own = self.own.lock();
        for l in &listening.0 {
            if l.tcp {
                own.add(l.what, l.addr);
            }
        }
    }

    /// `addr` as a person can type it: a wildcard bind shown as this host's
    /// address (or loopback).
    pub fn reachable(&self, addr: SocketAddr) -> SocketAddr {
        if addr.ip().is_unspecified() {
            SocketAddr::new(self.host_ip.unwrap_or(IpAddr::from([127, 0, 0, 1])), addr.port())
        } else {
            addr
        }
    }
}

/// One bound socket of a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Its key in `/api/status` `addresses` (`dns`, `lb_http`, `vpn` ...).
    pub key: &'static str,
    /// What it is, for people and for [`OwnListeners`] (`dns`, `lb http` ...).
    pub what: &'static str,
    /// The bound address.
    pub addr: SocketAddr,
    /// A TCP listener (the appliance's own; UDP-only ones are not).
    pub tcp: bool,
    /// Shown as a list in `/api/status` even when there is one (the dns's).
    pub list: bool,
}

/// Where a bound component listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening(pub Vec<Listener>);

impl Listening {
    /// The addresses under `key`.
    pub fn get<'a>(&'a self, key: &'a str) -> impl Iterator<Item = SocketAddr> + 'a {
        self.0.iter().filter(move |l| l.key == key).map(|l| l.addr)
    }
}

/// Everything one run of a component needs, bound (sockets, a TUN interface,
/// loaded state) but not yet serving.
pub trait Bound: Send {
    /// Where it listens.
    fn listening(&self) -> Listening;
    /// Serves until `shutdown` is cancelled (then `Ok`); an error, or `Ok`
    /// before `shutdown`, ends the run and the supervisor restarts it.
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxFuture<'static, Result<(), ComponentError>>;
}

/// A request to a component's part of the admin API, `/api/<name>/<path...>`,
/// already authorised by the admin endpoint (token, Host, Origin).
#[derive(Debug)]
pub struct ApiRequest<'a> {
    /// GET, POST, DELETE ...
    pub method: &'a http::Method,
    /// The path after `/api/<name>/`, split at `/`.
    pub path: &'a [&'a str],
    /// The body (bounded by the admin endpoint).
    pub body: &'a [u8],
    /// Sent by the status page's form (answer with a page), not by an API client.
    pub is_form: bool,
    /// The query the status page's links carry (form secret, token), escaped for HTML.
    pub page_query: &'a str,
    /// Whether the plan starts this component on this host.
    pub started: bool,
}

/// A component's answer to an [`ApiRequest`].
#[derive(Debug)]
pub enum ApiAnswer {
    /// JSON with this status.
    Json(http::StatusCode, serde_json::Value),
    /// An HTML page with this status (form requests).
    Html(http::StatusCode, String),
    /// An action done: JSON for API clients, back to the status page for forms.
    Done(http::StatusCode, serde_json::Value),
}

/// A component's part of the status page.
#[derive(Debug, Default)]
pub struct PageParts {
    /// Items of the "Listening" list (HTML, escaped by the component).
    pub listening: Vec<String>,
    /// Sections of its own (HTML), after the common ones.
    pub sections: String,
}

/// The banner `up` prints once ready: where things are and what to try.
#[derive(Debug, Default)]
pub struct Banner {
    /// `  dns      127.0.0.1:53 (udp+tcp)` lines.
    pub places: Vec<String>,
    /// Commands that put a service in Consul (tried first; without any, the
    /// banner shows a registration with curl).
    pub registers: Vec<String>,
    /// Commands to try.
    pub tries: Vec<String>,
}

/// What `up` tells a component about the host for its banner and pages.
#[derive(Debug, Clone)]
pub struct Host {
    /// The Consul domain, without its trailing dot (`consul`).
    pub domain: String,
    /// The Consul datacenter.
    pub datacenter: String,
    /// The admin endpoint, as a person can reach it, when on.
    pub admin: Option<SocketAddr>,
    /// The config file (for commands to copy).
    pub source: String,
}

/// A component of the appliance. One value per process (it outlives
/// restarts): counters and state the admin endpoint reads live here.
pub trait Component: std::any::Any + Send + Sync {
    /// Its unit name (`dns`, `lb` ...): the key of its part of `/api/status`.
    fn name(&self) -> &'static str;

    /// Binds everything one run needs.
    fn bind(&self) -> Result<Box<dyn Bound>, ComponentError>;

    /// Where its last bind listens (empty before the first).
    fn listening(&self) -> Listening;

    /// Its Prometheus series (called per scrape, only where it runs).
    fn metrics(&self, _out: &mut prometheus::Writer) {}

    /// Its points of the status page's charts (called once per
    /// [`crate::report::timeline::STEP`] by the sampler, only where it runs):
    /// the counters it keeps anyway, read; nothing on a hot path changes.
    fn sample(&self, _tick: &mut Tick<'_>) {}

    /// Its part of `/api/status`; `started`: the plan starts it here.
    fn status(&self, started: bool) -> serde_json::Value;

    /// Whether it does its job yet, asked only while its unit runs (for
    /// `GET /api/ready`, `wayfinder status`'s exit code, the HEALTHCHECK):
    /// `Err` says what it still waits for. Default: running is ready.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Its part of the status page.
    fn page(&self, _started: bool, _page_query: &str, _parts: &mut PageParts) {}

    /// Its lines of the banner.
    fn banner(&self, _appliance: &Appliance, _host: &Host, _banner: &mut Banner) {}

    /// Re-reads what can be re-read without a restart (SIGHUP); false when
    /// it has nothing of the kind.
    fn reload(&self) -> bool {
        false
    }

    /// Adds what it knows about the services (the lb: the URLs that reach
    /// them and its view of each instance).
    fn annotate(&self, _services: &mut [ServiceReport], _host: &Host) {}

    /// Its admin actions; `None`: no such action.
    fn api<'a>(&'a self, _req: ApiRequest<'a>) -> BoxFuture<'a, Option<ApiAnswer>> {
        Box::pin(async { None })
    }
}

/// A Consul service as the status page and `/api/status` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// The union of its instances' tags.
    pub tags: Vec<String>,
    /// DNS names that resolve it through the dns component.
    pub dns_names: Vec<String>,
    /// URLs that reach it through the lb (empty unless tagged for it).
    pub urls: Vec<String>,
    /// Its instances.
    pub instances: Vec<InstanceReport>,
}

/// One instance of a service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceReport {
    /// Consul service ID.
    pub id: String,
    /// Node.
    pub node: String,
    /// Address and port.
    pub address: String,
    /// Worst check status: `passing`, `warning` or `critical`.
    pub health: String,
    /// The lb's own view (`up`, `down`, `refused: <why>`), when it routes this instance.
    pub lb: Option<String>,
}
