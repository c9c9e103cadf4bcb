//! `wayfinder up`: the supervisor that makes Wayfinder one appliance (replaces
//! supervisord and PanteraS's `generate_yml.sh` role logic).
//!
//! ```text
//!  env + config ──roles::plan──▶ Plan (units by priority, each on/off and why)
//!  UpSockets::bind: admin + every component's listeners (port clash = exit 64)
//!  run(config, sockets, state, shutdown):
//!    admin::serve ─────────────── JSON API, actions, /metrics, status page
//!    sampler ─────────────────── a chart point of everything every timeline::STEP
//!    consul monitor ──────────── leader? ─▶ consul_ready (lb waits, bounded)
//!    for unit in plan (priority order):
//!       consul / [[supervisor.program]] ─▶ program::supervise (child process)
//!       components (dns, lb, vpn ...)   ─▶ component::supervise (task)
//!    all started ─▶ banner on stdout + sd_notify READY=1
//!    shutdown ─▶ STOPPING=1, units stopped one by one in reverse start order
//!    a unit's supervising task dies (panic) ─▶ the same stop, then UnitDied (exit 70)
//!    admin / consul monitor / reaper task dies ─▶ the same stop, then TaskDied (exit 70)
//! ```
//!
//! Each unit has its own cancellation token (not one shared child token) so that
//! shutdown can go in reverse order: the lb drains and deregisters from Consul
//! while Consul still runs.
//!
//! The supervisor knows components only through [`crate::component`]: it
//! binds, runs and restarts them, and the admin endpoint asks each for its
//! metrics, its part of the status report and page, and its actions.

pub mod admin;
pub mod charts;
pub mod component;
pub mod consul;
pub mod consul_words;
pub mod metrics;
pub mod notify;
pub mod program;
pub mod readiness;
pub mod reaper;
pub mod report;
pub mod roles;
pub mod sampler;
pub mod settings;
pub mod status_page;
pub mod terminal;
pub mod top;
pub mod unit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::component::{Appliance, Banner, Bound, Component, Host, Listening};
use crate::config::Config;
use crate::consul::settings::ConsulConfig;
use component::ComponentContext;
use program::ProgramContext;
use reaper::ChildSet;
use roles::{Plan, UnitKind};
use settings::SupervisorConfig;
use unit::{UnitClass, UnitHandle, UnitState};

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The admin endpoint could not be bound.
    #[error("could not bind the admin endpoint on {addr}: {source}")]
    BindAdmin {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A component's listeners could not be bound at start.
    #[error("could not start {component}: {source}")]
    BindComponent {
        /// dns, lb ...
        component: &'static str,
        /// What failed (names the address).
        source: crate::component::ComponentError,
    },
    /// A unit's supervising task ended before shutdown (a panic in the
    /// supervisor itself): `up` stops everything and exits 70.
    #[error("the supervisor of unit {unit} died: {message}")]
    UnitDied {
        /// The unit.
        unit: String,
        /// `panicked: <message>`, or how else it ended.
        message: String,
    },
    /// One of `up`'s own tasks (admin endpoint, Consul monitor, orphan reaper)
    /// ended before shutdown (a panic): `up` stops everything and exits 70.
    #[error("the {task} task of up died: {message}")]
    TaskDied {
        /// Which task.
        task: String,
        /// `panicked: <message>`, or how else it ended.
        message: String,
    },
    /// `wayfinder status` could not get the picture from the admin endpoint.
    #[error("could not get the status from the admin endpoint at {addr}: {problem}")]
    Status {
        /// The admin address asked.
        addr: SocketAddr,
        /// What went wrong.
        problem: String,
    },
}

/// What `up` itself is configured with: its own section, Consul's, and this
/// host (the components' sections went to the components).
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// `[supervisor]`.
    pub supervisor: SupervisorConfig,
    /// `[consul]`.
    pub consul: ConsulConfig,
    /// This host's address (`HOST_IP`), when known.
    pub host_ip: Option<std::net::IpAddr>,
    /// Where the configuration came from (for messages and commands to copy).
    pub source: String,
}

impl UpConfig {
    /// `up`'s part of `config`.
    pub fn of(config: &Config) -> Self {
        Self {
            supervisor: config.supervisor.clone(),
            consul: config.consul.clone(),
            host_ip: config.host_ip,
            source: config.source.clone(),
        }
    }
}

/// Everything `up` binds before it starts anything, so a port clash ends it at
/// once (exit 64) rather than as a crash loop.
#[derive(Default)]
pub struct UpSockets {
    /// The admin endpoint, unless off.
    pub admin: Option<std::net::TcpListener>,
    /// First-start resources of the components that start, by unit name.
    pub components: Vec<(&'static str, Box<dyn Bound>)>,
}

impl UpSockets {
    /// Binds the admin endpoint and every component `plan` starts; what they
    /// bound is recorded in `appliance` (its own listeners).
    pub fn bind(
        up: &UpConfig,
        plan: &Plan,
        components: &[Arc<dyn Component>],
        appliance: &Appliance,
    ) -> Result<Self, SupervisorError> {
        let admin = up
            .supervisor
            .admin
            .map(|addr| {
                crate::net::listeners::bind_tcp(addr).map_err(|source| SupervisorError::BindAdmin { addr, source })
            })
            .transpose()?;
        let mut bound = Vec::new();
        for component in components.iter().filter(|c| plan.starts(c.name())) {
            let resources = component.bind().map_err(|source| SupervisorError::BindComponent {
                component: component.name(),
                source,
            })?;
            appliance.listened(&resources.listening());
            bound.push((component.name(), resources));
        }
        if let Some(addr) = admin.as_ref().and_then(|l| l.local_addr().ok()) {
            appliance.listened(&Listening(vec![crate::component::Listener {
                key: "admin",
                what: "admin",
                addr,
                tcp: true,
                list: false,
            }]));
        }
        Ok(Self {
            admin,
            components: bound,
        })
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where a component listens, by `/api/status` key (`dns`, `lb_http` ...).
    pub fn listening(&self, key: &str) -> Vec<SocketAddr> {
        self.components
            .iter()
            .flat_map(|(_, b)| b.listening().get(key).collect::<Vec<_>>())
            .collect()
    }
}

/// Listen addresses of a running `up`, as `/api/status` shows them: `admin`,
/// and each component's keys (`dns` a list; `lb_http`, `vpn` ... one address).
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    /// Admin endpoint.
    pub admin: Option<SocketAddr>,
    /// The components' listeners.
    pub components: Listening,
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut keys: Vec<&'static str> = Vec::new();
        for l in &self.components.0 {
            if !keys.contains(&l.key) {
                keys.push(l.key);
            }
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("admin", &self.admin)?;
        for key in keys {
            let addrs: Vec<SocketAddr> = self.components.get(key).collect();
            if self.components.0.iter().any(|l| l.key == key && l.list) {
                map.serialize_entry(key, &addrs)?;
            } else {
                map.serialize_entry(key, &addrs.first())?;
            }
        }
        map.end()
    }
}

/// What the supervisor knows about the Consul agent right now.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsulHealth {
    /// Its HTTP API address.
    pub addr: Option<SocketAddr>,
    /// It answered the last probe.
    pub reachable: bool,
    /// The raft leader it reported (empty: no leader yet).
    pub leader: Option<String>,
    /// Why the last probe failed.
    pub error: Option<String>,
    /// When the last probe ended (readiness counts only probes of the agent's
    /// current run).
    #[serde(skip)]
    pub probed: Option<Instant>,
}

/// The state `up` shares with the admin API.
pub struct SupervisorState {
    /// `up`'s own configuration.
    pub config: Arc<UpConfig>,
    /// What the role starts.
    pub plan: Plan,
    /// Every unit of the plan, in start order.
    pub units: Vec<Arc<UnitHandle>>,
    /// Every component, whether the plan starts it or not (in display order).
    pub components: Vec<Arc<dyn Component>>,
    /// What the components share: Consul, this host, the own listeners.
    pub appliance: Arc<Appliance>,
    /// Consul as last probed.
    pub consul: Mutex<ConsulHealth>,
    /// Listen addresses, filled in by [`run`].
    pub addresses: Mutex<Addresses>,
    /// When `up` started.
    pub started: Instant,
    /// Set once every unit has started (or failed).
    pub ready: AtomicBool,
    /// Pids of the programs, for the orphan reaper.
    pub children: Arc<ChildSet>,
    /// Whether this process reaps orphaned descendants (the binary, not tests).
    adopt_orphans: bool,
    /// Secret of the status page's forms (random per process): an action with
    /// `Origin: null` must carry it (see `admin::same_site`).
    pub csrf: String,
    /// The last 15 minutes of every chart (written by the sampler, read by
    /// the status page); bounded, see [`crate::report::timeline`].
    pub timeline: Mutex<crate::report::timeline::Timeline>,
    supervised: Mutex<Vec<String>>,
}

impl SupervisorState {
    /// State for `plan` over `components`. `adopt_orphans`: this process is a
    /// child subreaper and all its children are the supervisor's (true only in
    /// the `up` binary).
    pub fn new(
        config: UpConfig,
        plan: Plan,
        components: Vec<Arc<dyn Component>>,
        appliance: Arc<Appliance>,
        adopt_orphans: bool,
    ) -> Arc<Self> {
        let units = plan
            .units
            .iter()
            .map(|u| {
                let class = match u.kind {
                    UnitKind::Component(_) => UnitClass::Component,
                    _ => UnitClass::Program,
                };
                let state = if u.start { UnitState::Starting } else { UnitState::Off };
                Arc::new(UnitHandle::new(&u.name, class, state, &u.why, u.priority))
            })
            .collect();
        Arc::new(Self {
            consul: Mutex::new(ConsulHealth {
                addr: Some(config.consul.http),
                ..ConsulHealth::default()
            }),
            config: Arc::new(config),
            plan,
            units,
            components,
            appliance,
            addresses: Mutex::new(Addresses::default()),
            started: Instant::now(),
            ready: AtomicBool::new(false),
            children: Arc::new(ChildSet::default()),
            adopt_orphans,
            csrf: format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>()),
            timeline: Mutex::new(crate::report::timeline::Timeline::default()),
            supervised: Mutex::new(Vec::new()),
        })
    }

    /// The unit called `name`.
    pub fn unit(&self, name: &str) -> Option<&Arc<UnitHandle>> {
        self.units.iter().find(|u| u.name() == name)
    }

    /// The component called `name`.
    pub fn component(&self, name: &str) -> Option<&Arc<dyn Component>> {
        self.components.iter().find(|c| c.name() == name)
    }

    /// The component of type `C` (tests and tools that know its type).
    pub fn component_of<C: Component>(&self) -> Option<&C> {
        self.components.iter().find_map(|c| {
            let any: &dyn std::any::Any = c.as_ref();
            any.downcast_ref::<C>()
        })
    }

    /// True when `name` has a supervisor that an admin restart reaches.
    pub fn is_supervised(&self, name: &str) -> bool {
        self.supervised.lock().iter().any(|n| n == name)
    }

    /// Consul as last probed.
    pub fn consul_health(&self) -> ConsulHealth {
        self.consul.lock().clone()
    }

    /// Listen addresses.
    pub fn addresses(&self) -> Addresses {
        self.addresses.lock().clone()
    }

    /// What the components are told about this host for their banner lines and pages.
    pub fn host(&self) -> Host {
        Host {
            domain: self.config.consul.domain.to_string().trim_end_matches('.').to_string(),
            datacenter: self.config.consul.datacenter.clone(),
            admin: self.addresses().admin.map(|a| self.appliance.reachable(a)),
            source: self.config.source.clone(),
        }
    }
}

/// Probes Consul's leader endpoint: often until it first answers with a leader
/// (the lb waits on that), then every two seconds for the status page.
async fn monitor_consul(
    state: Arc<SupervisorState>,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let addr = state.config.consul.http;
    let http = state.appliance.consul.http().clone();
    loop {
        let probe = match tokio::time::timeout(Duration::from_secs(1), http.leader()).await {
            Ok(Ok(leader)) => Ok(leader),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1s".to_string()),
        };
        let has_leader = matches!(&probe, Ok(l) if !l.is_empty());
        {
            let mut health = state.consul.lock();
            match probe {
                Ok(leader) => {
                    health.reachable = true;
                    health.leader = Some(leader);
                    health.error = None;
                }
                Err(e) => {
                    health.reachable = false;
                    health.error = Some(e);
                }
            }
            health.probed = Some(Instant::now());
        }
        if has_leader && !*ready.borrow() {
            tracing::info!(consul = %addr, "consul has a leader");
            // From now on a failed request to it is an outage, not its start.
            http.set_phase(crate::consul::http::AgentPhase::Up);
            ready.send_replace(true);
        }
        let pause = if *ready.borrow() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One running unit: its stop token and its supervising task.
struct Running {
    name: String,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    grace: Duration,
    /// One of `up`'s own tasks rather than a unit's supervisor.
    own: bool,
}

/// Grace of `up`'s own tasks at shutdown (the admin endpoint finishing its answers).
const OWN_TASK_GRACE: Duration = Duration::from_secs(2);

impl Running {
    /// One of `up`'s own tasks, stopped by `token`.
    fn own(name: &str, token: CancellationToken, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            name: name.to_string(),
            token,
            task,
            grace: OWN_TASK_GRACE,
            own: true,
        }
    }
}

/// Runs everything the plan starts until `shutdown`, then stops it all in
/// reverse start order.
pub async fn run(
    sockets: UpSockets,
    state: Arc<SupervisorState>,
    shutdown: CancellationToken,
) -> Result<(), SupervisorError> {
    {
        let mut addresses = state.addresses.lock();
        addresses.admin = sockets.admin_addr();
        addresses.components = Listening(sockets.components.iter().flat_map(|(_, b)| b.listening().0).collect());
    }
    let UpSockets { admin, components } = sockets;
    let consul_http = state.appliance.consul.http().clone();
    if state.plan.starts_consul() {
        // Until its first leader, a failed request to it is its start-up.
        consul_http.set_phase(crate::consul::http::AgentPhase::Starting);
    }
    // Everything `up` runs, in start order: its own tasks first, so they stop
    // last; a task that ends before shutdown (a panic) stops it all.
    let (mut running, consul_ready) = start_own_tasks(&state, admin)?;
    start_units(&state, components, consul_ready, &mut running);

    // A unit's supervising task only ends on shutdown; one that ends before
    // (a panic in it) leaves its unit unwatched, so `up` stops it all and fails.
    let mut died = wait_ready(&state, &mut running, &shutdown).await;
    if died.is_none() {
        died = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            ended = first_ended(&mut running) => Some(ended),
        };
    }
    let failure = died.map(|(index, joined)| {
        let ended = running.remove(index);
        let error = death(ended.name, ended.own, joined);
        match &error {
            SupervisorError::UnitDied { unit, message } => {
                tracing::error!(%unit, how = %message, "a unit's supervisor died; stopping everything");
                if let Some(handle) = state.unit(unit) {
                    handle.ended(format!("its supervisor died: {message}"));
                    handle.set_state(UnitState::Failed);
                }
            }
            other => tracing::error!(error = %other, "stopping everything"),
        }
        error
    });
    notify::notify("STOPPING=1");
    // Consul stops before the views that follow it: their failures now are ours.
    consul_http.set_phase(crate::consul::http::AgentPhase::Stopping);
    for unit in running.into_iter().rev() {
        tracing::info!(unit = %unit.name, "stopping");
        unit.token.cancel();
        let mut task = unit.task;
        if tokio::time::timeout(unit.grace, &mut task).await.is_err() {
            tracing::warn!(unit = %unit.name, grace = ?unit.grace, "did not stop in time");
            task.abort();
        }
    }
    state.appliance.close().await;
    tracing::info!("wayfinder up: stopped");
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// `up`'s own tasks: the orphan reaper (in the binary), the admin endpoint,
/// the chart sampler, the Consul monitor; and the receiver that turns `true` once the built-in
/// Consul has a leader.
fn start_own_tasks(
    state: &Arc<SupervisorState>,
    admin: Option<std::net::TcpListener>,
) -> Result<(Vec<Running>, tokio::sync::watch::Receiver<bool>), SupervisorError> {
    let mut running = Vec::new();
    if state.adopt_orphans {
        let stop = CancellationToken::new();
        let task = tokio::spawn(reaper::run(state.children.clone(), stop.clone()));
        running.push(Running::own("orphan reaper", stop, task));
    }
    if let Some(listener) = admin {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| SupervisorError::BindAdmin { addr, source })?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(admin::serve(listener, state.clone(), stop.clone()));
        running.push(Running::own("admin endpoint", stop, task));
    }
    let stop = CancellationToken::new();
    let task = tokio::spawn(sampler::run(state.clone(), stop.clone()));
    running.push(Running::own("sampler", stop, task));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let task = tokio::spawn(monitor_consul(state.clone(), ready_tx, stop.clone()));
    running.push(Running::own("consul monitor", stop, task));
    Ok((running, ready_rx))
}

/// Starts a supervising task for every unit the plan starts (programs also
/// when off: an admin restart starts them), in priority order, each on a
/// token of its own; components get the resources `up` bound for them.
fn start_units(
    state: &Arc<SupervisorState>,
    mut components: Vec<(&'static str, Box<dyn Bound>)>,
    consul_ready: tokio::sync::watch::Receiver<bool>,
    running: &mut Vec<Running>,
) {
    let config = &state.config;
    let runs_consul = state.plan.starts_consul();
    let program_ctx = ProgramContext {
        restart: config.supervisor.restart,
        children: state.children.clone(),
        consul_ready: runs_consul.then(|| consul_ready.clone()),
        consul_wait: config.supervisor.consul_wait,
    };
    for (planned, handle) in state.plan.units.iter().zip(&state.units) {
        let token = CancellationToken::new();
        let (task, grace) = match &planned.kind {
            UnitKind::Consul(mode) if planned.start => {
                let program = consul::program(config, &state.plan, *mode);
                if let Err(e) = std::fs::create_dir_all(&config.supervisor.consul.data_dir) {
                    tracing::warn!(dir = %config.supervisor.consul.data_dir.display(), error = %e, "could not create the consul data dir");
                }
                tracing::info!(args = ?program.args, "consul agent");
                let grace = program::worst_stop_time(&program);
                let supervise = program::supervise(program, handle.clone(), program_ctx.clone(), true, token.clone());
                (tokio::spawn(supervise), grace)
            }
            UnitKind::Program(i) => {
                let program = config.supervisor.programs[*i].clone();
                let grace = program::worst_stop_time(&program);
                let supervise = program::supervise(
                    program,
                    handle.clone(),
                    program_ctx.clone(),
                    planned.start,
                    token.clone(),
                );
                (tokio::spawn(supervise), grace)
            }
            UnitKind::Component(kind) if planned.start => {
                let Some(component) = state.component(kind.name()).cloned() else {
                    continue;
                };
                let first = components
                    .iter()
                    .position(|(name, _)| *name == kind.name())
                    .map(|i| components.swap_remove(i).1);
                let ctx = ComponentContext {
                    appliance: state.appliance.clone(),
                    restart: config.supervisor.restart,
                    consul_ready: (runs_consul && kind.facts().needs_consul).then(|| consul_ready.clone()),
                    consul_wait: config.supervisor.consul_wait,
                };
                let supervise = component::supervise(component, first, ctx, handle.clone(), token.clone());
                (tokio::spawn(supervise), component::STOP_GRACE + Duration::from_secs(1))
            }
            // Off by role: nothing to supervise.
            _ => continue,
        };
        state.supervised.lock().push(planned.name.clone());
        running.push(Running {
            name: planned.name.clone(),
            token,
            task,
            grace,
            own: false,
        });
    }
}

/// Waits for the ready moment: every unit has left its start-up states (or
/// the wait for Consul ran out, after which the lb starts anyway); then
/// prints the banner and tells systemd. A task that ended first is returned.
async fn wait_ready(
    state: &SupervisorState,
    running: &mut [Running],
    shutdown: &CancellationToken,
) -> Option<(usize, Result<(), tokio::task::JoinError>)> {
    let settle = state.config.supervisor.consul_wait + Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        let pending = state.units.iter().any(|u| u.state().is_pending());
        if !pending || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            ended = first_ended(running) => return Some(ended),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    if !shutdown.is_cancelled() {
        state.ready.store(true, Ordering::Relaxed);
        println!("{}", banner(state));
        notify::notify("READY=1");
        tracing::info!("wayfinder up: ready");
    }
    None
}

/// The error for a task of `up` that ended before shutdown.
fn death(name: String, own: bool, joined: Result<(), tokio::task::JoinError>) -> SupervisorError {
    let message = match joined {
        Ok(()) => "returned without being asked to stop".to_string(),
        Err(join) => crate::threads::join_error_message(join),
    };
    if own {
        SupervisorError::TaskDied { task: name, message }
    } else {
        SupervisorError::UnitDied { unit: name, message }
    }
}

/// The first of the running units' supervising tasks to end: its index and
/// how it ended (pending forever while none has, or none is left).
fn first_ended(
    running: &mut [Running],
) -> impl std::future::Future<Output = (usize, Result<(), tokio::task::JoinError>)> + '_ {
    std::future::poll_fn(move |cx| {
        for (index, unit) in running.iter_mut().enumerate() {
            if let std::task::Poll::Ready(joined) = std::pin::Pin::new(&mut unit.task).poll(cx) {
                return std::task::Poll::Ready((index, joined));
            }
        }
        std::task::Poll::Pending
    })
}

/// What `up` prints once it is ready: where everything is and what to try.
pub fn banner(state: &SupervisorState) -> String {
    let config = &state.config;
    let appliance = &state.appliance;
    let host = state.host();
    let mut out = String::from("wayfinder up: ready\n");
    out.push_str(&format!("  role     {}\n", state.plan.role()));
    for u in &state.units {
        let s = u.snapshot();
        if s.state != UnitState::Off {
            out.push_str(&format!("  {:<8} {}\n", s.name, s.state.name()));
        }
    }
    let mut banner = Banner::default();
    for c in state.components.iter().filter(|c| state.plan.starts(c.name())) {
        c.banner(appliance, &host, &mut banner);
    }
    for place in &banner.places {
        out.push_str(place);
        out.push('\n');
    }
    if let Some(admin) = host.admin {
        out.push_str(&format!(
            "  admin    http://{admin}/ (status page, /api/status, /metrics)\n"
        ));
    }
    let consul = appliance.reachable(config.consul.http);
    if state.plan.starts_consul() {
        out.push_str(&format!("  consul   http://{consul}/ui/\n"));
    } else {
        out.push_str(&format!("  consul   http://{consul}/ (not started by up)\n"));
    }
    out.push_str("try:\n");
    if banner.registers.is_empty() {
        out.push_str(&format!(
            "  curl -X PUT -d '{{\"Name\":\"web\",\"Address\":\"127.0.0.1\",\"Port\":8080,\"Tags\":[\"haproxy\"]}}' http://{consul}/v1/agent/service/register\n"
        ));
    }
    for t in banner.registers.iter().chain(&banner.tries) {
        out.push_str(t);
        out.push('\n');
    }
    if host.admin.is_some() {
        out.push_str(&format!("  {} status -c {}\n", invoked_as(), config.source));
    }
    out
}

/// How this binary was started, for commands to copy from the banner:
/// `target/release/wayfinder` when run by a path (the standalone script),
/// else `wayfinder` (from PATH, or a test binary running `up` in-process).
fn invoked_as() -> String {
    let ours = std::env::current_exe()
        .ok()
        .is_some_and(|p| p.file_name().is_some_and(|n| n == "wayfinder"));
    std::env::args()
        .next()
        .filter(|a| ours && a.contains('/'))
        .unwrap_or_else(|| "wayfinder".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(name: &str, task: tokio::task::JoinHandle<()>) -> Running {
        Running {
            name: name.into(),
            token: CancellationToken::new(),
            task,
            grace: Duration::from_secs(1),
            own: false,
        }
    }

    #[tokio::test]
    async fn one_of_ups_own_tasks_that_panics_ends_it_with_task_died() {
        let mut all = vec![
            Running::own(
                "admin endpoint",
                CancellationToken::new(),
                tokio::spawn(async { panic!("admin bug") }),
            ),
            running("lb", tokio::spawn(std::future::pending())),
        ];
        let (index, joined) = tokio::time::timeout(Duration::from_secs(5), first_ended(&mut all))
            .await
            .expect("the panicked one is seen");
        let ended = all.remove(index);
        let error = death(ended.name, ended.own, joined);
        assert!(
            matches!(&error, SupervisorError::TaskDied { task, message } if task == "admin endpoint" && message.contains("admin bug")),
            "{error}"
        );
        let app = crate::AppError::Supervisor(error);
        assert_eq!(app.exit_code(), crate::EXIT_SOFTWARE);
    }

    #[tokio::test]
    async fn a_unit_supervisor_that_panics_is_seen_ending() {
        let mut units = vec![
            running("consul", tokio::spawn(std::future::pending())),
            running("dns", tokio::spawn(async { panic!("supervise bug") })),
            running("lb", tokio::spawn(std::future::pending())),
        ];
        let (index, joined) = tokio::time::timeout(Duration::from_secs(5), first_ended(&mut units))
            .await
            .expect("the panicked one is seen");
        assert_eq!(units[index].name, "dns");
        assert_eq!(
            crate::threads::join_error_message(joined.unwrap_err()),
            "panicked: supervise bug"
        );
        units.remove(index);
        // The others run on: nothing ends until they do.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), first_ended(&mut units))
                .await
                .is_err()
        );
        for u in &units {
            u.task.abort();
        }
    }
}
