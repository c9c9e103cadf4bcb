//! Wayfinder: the per-host service-discovery appliance of a PanteraS-style
//! platform, in one binary.
//!
//! `main` parses the command line and sets up logging; [`run`] loads the
//! configuration and runs the chosen command. Each component lives in its own
//! folder and plugs in through one seam, [`component::Component`]; the
//! component list ([`components`]) is the one place that knows them all.
//!
//! Locks: shared state behind a lock uses `parking_lot::Mutex` (or `RwLock`),
//! never the std ones (`clippy.toml` makes them a lint error). A parking_lot
//! lock has no poisoning, so `.lock()` returns the guard with no `expect` or
//! `PoisonError` to handle, and a `Drop` impl that locks has no panic path
//! (a panic while already unwinding aborts the process). Locks are held for a
//! few statements and never across an `.await`; where a lock has to be held
//! across one, it is a `tokio::sync::Mutex` (the Consul client's idle
//! connections).

#![warn(missing_docs)]

pub mod cli;
pub mod component;
pub mod components;
pub mod config;
pub mod consul;
pub mod dns;
pub mod env;
pub mod http_server;
pub mod lb;
pub mod net;
pub mod register;
pub mod report;
pub mod restricted;
pub mod signals;
pub mod supervisor;
pub mod threads;
pub mod vpn;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, PeerCommand, VpnCommand};
use config::shared::ConfigError;

/// How long components get to finish after SIGTERM before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Exit status for a configuration error (`EX_USAGE` in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// Exit status for a panic or a dead worker thread: a bug (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;

/// Exit status of `wayfinder status` when it got no status from the admin
/// endpoint: nothing listening, a refusal (401), no JSON (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Exit status of `wayfinder status` when `up` answered and a unit its role
/// needs is not ready (Docker's HEALTHCHECK "unhealthy").
pub const EXIT_NOT_READY: u8 = 1;

/// Everything that can end a command with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad configuration (exit 64).
    #[error("configuration error: {0}")]
    Config(#[source] ConfigError),
    /// A component run alone (`wayfinder dns`, `lb`, `vpn`) failed.
    #[error("{component}: {source}")]
    Component {
        /// `dns`, `lb`, `vpn`.
        component: &'static str,
        /// Its error, with the exit status it means.
        source: component::ComponentError,
    },
    /// The supervisor (`up`, `status`) failed.
    #[error("up: {0}")]
    Supervisor(#[source] supervisor::SupervisorError),
    /// A vpn peer command failed.
    #[error("vpn: {0}")]
    Vpn(#[source] vpn::VpnError),
    /// `wayfinder status`: `up` answered, and units its role needs are not ready (exit 1).
    #[error("not ready: {0}")]
    NotReady(String),
    /// A bind failed because an address is not this host's: the error, and
    /// which variable (and file line) set that address (exit as the error).
    #[error("{source}; {hint}")]
    NotLocal {
        /// The bind error.
        source: Box<AppError>,
        /// Which variables to change, and where they were set.
        hint: String,
    },
    /// The supervisor's or a component's task panicked (exit 70).
    #[error("the {component} task died: {message}")]
    Panicked {
        /// `supervisor`, `dns`, `lb`, `vpn`.
        component: &'static str,
        /// `panicked: <message>`, or `cancelled`.
        message: String,
    },
}

impl AppError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Config(_) => EXIT_CONFIG,
            AppError::Component { source, .. } => source.exit_code,
            AppError::Supervisor(
                supervisor::SupervisorError::BindAdmin { .. } | supervisor::SupervisorError::BindComponent { .. },
            ) => EXIT_CONFIG,
            AppError::Supervisor(
                supervisor::SupervisorError::UnitDied { .. } | supervisor::SupervisorError::TaskDied { .. },
            ) => EXIT_SOFTWARE,
            AppError::Supervisor(supervisor::SupervisorError::Status { .. }) => EXIT_UNAVAILABLE,
            AppError::NotReady(_) => EXIT_NOT_READY,
            AppError::Vpn(e) => component::Failure::exit_code(e),
            AppError::Panicked { .. } => EXIT_SOFTWARE,
            AppError::NotLocal { source, .. } => source.exit_code(),
        }
    }
}

/// A bind that failed because an address is not one of this host's
/// (`EADDRNOTAVAIL`, as with an example `restricted/host` copied unchanged)
/// says which of the address variables hold such an address, and the file and
/// line that set them, so the message names the line to change.
pub fn explain_not_local(error: AppError, env: &dyn env::Env) -> AppError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut not_available = false;
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EADDRNOTAVAIL))
        {
            not_available = true;
        }
        cause = e.source();
    }
    if !not_available {
        return error;
    }
    let culprits: Vec<String> = [env::LISTEN_IP, env::HOST_IP, env::IP, env::CONSUL_IP]
        .into_iter()
        .flat_map(|var| {
            // LISTEN_IP may name several addresses.
            let value = env.get(var).unwrap_or_default();
            let ips: Vec<std::net::IpAddr> = value
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter_map(|w| w.parse().ok())
                .collect();
            ips.into_iter()
                .filter(|&ip| !net::host::is_local(ip))
                .map(|ip| match env.origin(var) {
                    Some(origin) => format!("{var}={ip} ({origin})"),
                    None => format!("{var}={ip} (environment)"),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if culprits.is_empty() {
        return error;
    }
    AppError::NotLocal {
        hint: format!(
            "not an address of this host: {}; set it to one of this host's addresses, or leave it out \
             (listeners then take every address and the host address is guessed)",
            culprits.join(", ")
        ),
        source: Box::new(error),
    }
}

/// What a finished supervisor or component task means for the process: its
/// own result, or [`AppError::Panicked`] (exit 70) when it panicked or was
/// cancelled, so a crash never ends the process with status 0.
pub fn join_outcome(
    component: &'static str,
    joined: Result<Result<(), AppError>, tokio::task::JoinError>,
) -> Result<(), AppError> {
    match joined {
        Ok(result) => result,
        Err(join) => {
            let message = threads::join_error_message(join);
            tracing::error!(component, how = %message, "task died");
            Err(AppError::Panicked { component, message })
        }
    }
}

/// Logs every panic, on any thread (tokio workers, the lb's proxy threads, the
/// dns's UDP workers), as one error line with the thread's name, the location
/// and, with `RUST_BACKTRACE=1`, the backtrace. The panic then unwinds as
/// usual; whoever joins the task or thread turns its end into an error (see
/// [`threads`]). Without a tracing subscriber, the default hook prints it.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !tracing::dispatcher::has_been_set() {
            return default(info);
        }
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let message = threads::panic_message(info.payload());
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(thread, %location, %backtrace, "panic: {message}");
        } else {
            tracing::error!(thread, %location, "panic: {message}");
        }
    }));
}

/// What a failed command prints: `wayfinder: <error>`, then each cause in its
/// chain that the lines before do not already say (our errors name their cause
/// in their own message; a library's, such as hyper's, may not), so every cause
/// is printed once.
pub fn error_report(error: &dyn std::error::Error) -> String {
    let mut out = format!("wayfinder: {error}\n");
    let mut said = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            out.push_str(&format!("  caused by: {text}\n"));
            said.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Runs a parsed command line to completion.
pub async fn run(cli: Cli) -> Result<(), AppError> {
    match cli.command {
        Command::Check { config, restricted } => {
            let layered = restricted_env(restricted.as_deref())?;
            let env: &dyn env::Env = layered.as_ref().map_or(&env::ProcessEnv, |l| l);
            // The file's validator: every section, whatever this host starts.
            let (file, config) = config::load(config.as_deref(), env, config::Runs::ALL).map_err(AppError::Config)?;
            let plan = supervisor::roles::plan(env, &config).map_err(AppError::Config)?;
            print!("{}", render_check(&file, &config, &plan, layered.as_ref()));
            Ok(())
        }
        Command::Up { config, restricted } => {
            let layered = restricted_env(restricted.as_deref())?;
            let env: &dyn env::Env = layered.as_ref().map_or(&env::ProcessEnv, |l| l);
            let (_, config, plan) = load_for_up(config.as_deref(), env)?;
            if let Some(l) = &layered {
                tracing::info!(files = ?l.read, "PanteraS restricted folder read");
            }
            up(config, plan).await.map_err(|e| explain_not_local(e, env))
        }
        Command::Status { config, admin, json } => {
            let (addr, token) = admin_endpoint(config.as_deref(), admin)?;
            let report = supervisor::terminal::fetch(addr, token.as_deref())
                .await
                .map_err(AppError::Supervisor)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", supervisor::terminal::render(&report));
                print!("{}", components::terminal_sections(&report));
            }
            let missing = supervisor::terminal::not_ready(&report);
            if missing.is_empty() {
                Ok(())
            } else {
                let named: Vec<String> = missing.iter().map(|(unit, why)| format!("{unit} ({why})")).collect();
                Err(AppError::NotReady(named.join(", ")))
            }
        }
        Command::Top {
            config,
            admin,
            interval,
        } => {
            let (addr, token) = admin_endpoint(config.as_deref(), admin)?;
            supervisor::top::run(addr, token.as_deref(), interval).await;
            Ok(())
        }
        Command::Dns { config } => alone(config.as_deref(), components::ComponentKind::Dns).await,
        Command::Lb { config } => alone(config.as_deref(), components::ComponentKind::Lb).await,
        Command::Register { config } => alone(config.as_deref(), components::ComponentKind::Register).await,
        Command::Vpn { config, action } => match action {
            Some(VpnCommand::Peer { command }) => {
                let (_, config) =
                    config::load(config.as_deref(), &env::ProcessEnv, config::Runs::VPN).map_err(AppError::Config)?;
                log_unchecked(&config);
                vpn_peer(&config, command)
            }
            None => alone(config.as_deref(), components::ComponentKind::Vpn).await,
        },
    }
}

/// The admin endpoint `status` and `top` ask (`--admin`, else the config's
/// `supervisor.admin`; a wildcard bind asked on loopback) and its token.
fn admin_endpoint(
    path: Option<&std::path::Path>,
    admin: Option<std::net::SocketAddr>,
) -> Result<(std::net::SocketAddr, Option<String>), AppError> {
    let (_, config) = config::load(path, &env::ProcessEnv, config::Runs::SUPERVISOR).map_err(AppError::Config)?;
    let addr = admin.or(config.supervisor.admin).ok_or_else(|| {
        AppError::Config(ConfigError {
            file: config.source.clone(),
            key: "supervisor.admin".into(),
            problem: "the admin endpoint is off (\"\"): give --admin ADDR".into(),
        })
    })?;
    let addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    Ok((addr, config.supervisor.token.clone()))
}

/// `wayfinder dns|lb|vpn`: one component, from its section, until SIGTERM/SIGINT.
async fn alone(path: Option<&std::path::Path>, kind: components::ComponentKind) -> Result<(), AppError> {
    let name = kind.name();
    let mut runs = config::Runs::NONE;
    kind.check_in(&mut runs);
    let (_, config) = config::load(path, &env::ProcessEnv, runs).map_err(AppError::Config)?;
    log_unchecked(&config);
    tracing::info!(config = %config.source, "starting {name}");
    let appliance = component::Appliance::new(&config.consul, config.host_ip, config.own_listeners());
    let component = components::build(kind, &config, &appliance);
    let failed = |source| AppError::Component {
        component: name,
        source,
    };
    let bound = component
        .bind()
        .map_err(|e| explain_not_local(failed(e), &env::ProcessEnv))?;
    appliance.listened(&bound.listening());
    signals::forward_hangups(vec![component.clone()]);
    let result = until_signal(name, move |shutdown| async move {
        bound.run(shutdown).await.map_err(failed)
    })
    .await;
    appliance.close().await;
    result
}

/// `wayfinder vpn peer add|list|remove`: edits the registry (the running server
/// picks the change up by itself) and prints the result.
fn vpn_peer(config: &config::Config, command: PeerCommand) -> Result<(), AppError> {
    match command {
        PeerCommand::Add { name, qr } => {
            // Checked before the state exists, so a config without an endpoint
            // leaves no server key behind.
            let inputs = vpn::ClientInputs::new(config.host_ip, &config.consul.domain, &config.source);
            vpn::client_endpoint(&config.vpn, &inputs).map_err(AppError::Config)?;
            let state = vpn::VpnState::new(&config.vpn).map_err(AppError::Vpn)?;
            let added = vpn::add_client(&config.vpn, &inputs, &state, &name).map_err(AppError::Vpn)?;
            let text = added.client.render();
            eprintln!(
                "added peer `{}` with address {}; its private key is shown only now:",
                added.record.name, added.record.address
            );
            print!("{text}");
            if qr {
                let code = vpn::client::qr(&text).map_err(|e| AppError::Vpn(vpn::VpnError::Peer(e.to_string())))?;
                println!("\n{code}");
            }
            Ok(())
        }
        PeerCommand::Remove { name } => {
            let state = vpn::VpnState::new(&config.vpn).map_err(AppError::Vpn)?;
            if state.remove_peer(&name).map_err(AppError::Vpn)? {
                eprintln!("removed peer `{name}`");
                Ok(())
            } else {
                Err(AppError::Vpn(vpn::VpnError::Peer(format!(
                    "there is no peer named `{name}`"
                ))))
            }
        }
        PeerCommand::List => {
            let store = vpn::peers::PeerStore::open(&config.vpn.dir).map_err(AppError::Vpn)?;
            let records = store.load().map_err(AppError::Vpn)?;
            let live = vpn::uapi::query(&config.vpn.interface);
            println!(
                "{:<20} {:<16} {:<18} {:>12} {:>12}  public key",
                "name", "address", "latest handshake", "received", "sent"
            );
            for r in records {
                let l = live.as_ref().and_then(|m| m.get(&r.public_key));
                let (hs, rx, tx) = match l {
                    Some(l) => (
                        vpn::uapi::ago(l.last_handshake),
                        l.rx_bytes.to_string(),
                        l.tx_bytes.to_string(),
                    ),
                    None => ("(server not running)".into(), "-".into(), "-".into()),
                };
                println!(
                    "{:<20} {:<16} {:<18} {:>12} {:>12}  {}",
                    r.name, r.address, hs, rx, tx, r.public_key
                );
            }
            Ok(())
        }
    }
}

/// `up`'s configuration: a first look, the role's plan from it,
/// then the sections of what the plan starts checked strictly.
fn load_for_up(
    path: Option<&std::path::Path>,
    env: &dyn env::Env,
) -> Result<(config::FileConfig, config::Config, supervisor::roles::Plan), AppError> {
    let (file, first) = config::load(path, env, config::Runs::NONE).map_err(AppError::Config)?;
    let plan = supervisor::roles::plan(env, &first).map_err(AppError::Config)?;
    let mut runs = config::Runs {
        supervisor: true,
        ..config::Runs::NONE
    };
    for kind in components::ComponentKind::ALL {
        // A section that turns its component on is checked even where the
        // plan leaves it off, so a mistake in it is never silent.
        if plan.starts(kind.name()) || kind.enabled_in(&file) {
            kind.check_in(&mut runs);
        }
    }
    let config = config::recheck(&file, &first, runs).map_err(AppError::Config)?;
    let plan = supervisor::roles::plan(env, &config).map_err(AppError::Config)?;
    log_unchecked(&config);
    Ok((file, config, plan))
}

/// Says what was not checked because this command does not run it.
fn log_unchecked(config: &config::Config) {
    for problem in &config.unchecked {
        tracing::info!(%problem, "not checked: its component does not run here");
    }
}

/// The environment of a PanteraS `restricted/` folder over the process's.
fn restricted_env(dir: Option<&std::path::Path>) -> Result<Option<restricted::Layered<'static>>, AppError> {
    dir.map(|dir| {
        restricted::Layered::read(dir, &env::ProcessEnv).map_err(|e| {
            AppError::Config(ConfigError {
                file: dir.display().to_string(),
                key: "(restricted)".into(),
                problem: e.to_string(),
            })
        })
    })
    .transpose()
}

/// `wayfinder up`: the role's plan, everything bound, then the supervisor until
/// SIGTERM/SIGINT (which stops it all in reverse order and exits 0), or until
/// it fails by itself (a unit's supervisor died: exit 70; a panic: exit 70).
async fn up(config: config::Config, plan: supervisor::roles::Plan) -> Result<(), AppError> {
    supervisor::consul::require_command(&supervisor::UpConfig::of(&config), &plan, &env::ProcessEnv)
        .map_err(AppError::Config)?;
    tracing::info!(config = %config.source, role = plan.role(), "starting up");
    match &config.host_address {
        Some(h) => tracing::info!("host address {} ({})", h.ip, h.from),
        None => tracing::warn!(
            "no host address (HOST_IP, IP) and none could be guessed: the lb registers and Consul binds on loopback; set IP in restricted/host or HOST_IP"
        ),
    }
    // Orphaned grandchildren of our programs are re-parented to us and reaped.
    let adopt = match supervisor::reaper::become_subreaper() {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "could not become a child subreaper; orphans go to init");
            false
        }
    };
    let (appliance, all) = components::assemble(&config);
    let up_config = supervisor::UpConfig::of(&config);
    let sockets = supervisor::UpSockets::bind(&up_config, &plan, &all, &appliance).map_err(AppError::Supervisor)?;
    signals::forward_hangups(all.iter().filter(|c| plan.starts(c.name())).cloned().collect());
    let state = supervisor::SupervisorState::new(up_config, plan, all, appliance, adopt);
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn({
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move {
            supervisor::run(sockets, state, shutdown)
                .await
                .map_err(AppError::Supervisor)
        }
    });
    let signal = tokio::select! {
        signal = signals::shutdown() => signal,
        // Unasked, the supervisor ends only on an error or a panic.
        ended = &mut task => return join_outcome("supervisor", ended),
    };
    tracing::info!(signal, "shutting down: stopping units in reverse start order");
    shutdown.cancel();
    join_outcome("supervisor", task.await)
}

/// Runs a component until SIGTERM/SIGINT, then cancels it and gives it
/// [`SHUTDOWN_GRACE`] to finish. A component that stops by itself (a start-up
/// error such as an unusable certificate, a dead worker thread) ends the
/// command with its result; one that panics, with [`AppError::Panicked`].
async fn until_signal<F, Fut>(name: &'static str, component: F) -> Result<(), AppError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), AppError>> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(component(shutdown.clone()));
    let signal = tokio::select! {
        signal = signals::shutdown() => signal,
        ended = &mut task => return join_outcome(name, ended),
    };
    tracing::info!(signal, component = name, "shutting down");
    shutdown.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, task).await {
        Ok(joined) => join_outcome(name, joined),
        Err(_) => {
            tracing::warn!(component = name, grace = ?SHUTDOWN_GRACE, "did not stop in time; exiting anyway");
            Ok(())
        }
    }
}

/// What `wayfinder check` prints: the effective file (after the environment) and
/// the values derived from it.
pub fn render_check(
    file: &config::FileConfig,
    config: &config::Config,
    plan: &supervisor::roles::Plan,
    restricted: Option<&restricted::Layered<'_>>,
) -> String {
    let mut out = format!("# effective configuration ({} + environment)\n", config.source);
    if let Some(r) = restricted {
        let files: Vec<String> = r.read.iter().map(|p| p.display().to_string()).collect();
        out.push_str(&format!("# restricted files read, in order: {}\n", files.join(", ")));
    }
    let mut shown = file.clone();
    if !shown.supervisor.token.is_empty() {
        // A secret: shown as set, never printed.
        shown.supervisor.token = "********".into();
    }
    out.push_str(&toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# (could not render: {e})\n")));
    out.push_str("\n# derived\n");
    out.push_str(&match &config.host_address {
        Some(h) => format!("# host address: {} ({})\n", h.ip, h.from),
        None => "# host address: none (HOST_IP and IP unset, nothing to guess from: set IP or HOST_IP)\n".into(),
    });
    out.push_str(&format!("# dns upstreams resolved: {:?}\n", config.dns.upstreams));
    for problem in &config.dns.upstream_problems {
        out.push_str(&format!("# dns upstream skipped: {problem}\n"));
    }
    if config.dns.upstreams.is_empty() {
        out.push_str(
            "# dns: no upstream resolver: names outside Consul, the zones and the wildcard domain answer SERVFAIL\n",
        );
    }
    out.push_str(&format!("# dns udp workers per address: {}\n", config.dns.workers));
    out.push_str("# wayfinder up would start:\n");
    out.push_str(&plan.render());
    out.push_str(&format!(
        "# vpn: {} on {}, subnet {}, client endpoint {}\n",
        if config.vpn.enabled { "enabled" } else { "disabled" },
        config.vpn.interface,
        config.vpn.subnet(),
        vpn::client_endpoint(
            &config.vpn,
            &vpn::ClientInputs::new(config.host_ip, &config.consul.domain, &config.source)
        )
        .unwrap_or_else(|_| "(unset: set vpn.endpoint or HOST_IP)".into())
    ));
    if let Some(https) = config.lb.https.as_ref().filter(|h| h.certs.is_empty()) {
        out.push_str(&format!(
            "# lb https: no lb.certs: a self-signed certificate of its own, kept in {}\n",
            https.state_dir.join(lb::selfsigned::FILE).display()
        ));
    }
    out.push_str("# environment variables read:\n");
    for (var, what) in env::VARS {
        out.push_str(&format!("#   {var:<22} {what}\n"));
    }
    out.push_str("configuration ok\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boom() -> Result<(), AppError> {
        panic!("bug in dns")
    }

    #[test]
    fn every_cause_is_printed_once() {
        let config = ConfigError {
            file: "w.toml".into(),
            key: "lb.certs".into(),
            problem: "no certificate files".into(),
        };
        let report = error_report(&AppError::Config(config));
        assert_eq!(
            report,
            "wayfinder: configuration error: w.toml: lb.certs: no certificate files\n"
        );
        // A cause the message does not say is still printed, once.
        #[derive(Debug, thiserror::Error)]
        #[error("consul at 127.0.0.1:8500: request failed")]
        struct Opaque(#[source] std::io::Error);
        let opaque = Opaque(std::io::Error::other("connection refused"));
        assert_eq!(
            error_report(&opaque),
            "wayfinder: consul at 127.0.0.1:8500: request failed\n  caused by: connection refused\n"
        );
    }

    #[tokio::test]
    async fn a_panicking_task_is_an_error_with_exit_70() {
        let joined = tokio::spawn(async { boom() }).await;
        let error = join_outcome("dns", joined).unwrap_err();
        assert!(
            matches!(&error, AppError::Panicked { component: "dns", message } if message == "panicked: bug in dns"),
            "{error:?}"
        );
        assert_eq!(error.exit_code(), EXIT_SOFTWARE);
        assert_eq!(error.to_string(), "the dns task died: panicked: bug in dns");
        // A task's own result passes through, exit code and all.
        assert!(join_outcome("lb", tokio::spawn(async { Ok(()) }).await).is_ok());
        let failed = tokio::spawn(async {
            Err(AppError::Component {
                component: "lb",
                source: lb::LbError::TaskEnded("routing table").into(),
            })
        });
        assert_eq!(join_outcome("lb", failed.await).unwrap_err().exit_code(), 1);
    }

    #[tokio::test]
    async fn until_signal_ends_a_panicked_component_with_exit_70() {
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            until_signal("dns", |_shutdown| async { boom() }),
        )
        .await
        .expect("a panic ends it at once, with no signal");
        assert_eq!(outcome.unwrap_err().exit_code(), EXIT_SOFTWARE);
        let died = tokio::time::timeout(
            Duration::from_secs(5),
            until_signal("lb", |_shutdown| async {
                Err(AppError::Component {
                    component: "lb",
                    source: lb::LbError::WorkerDied {
                        name: "lb-proxy-0".into(),
                        how: "panicked: x".into(),
                    }
                    .into(),
                })
            }),
        )
        .await
        .unwrap();
        assert_eq!(died.unwrap_err().exit_code(), EXIT_SOFTWARE);
    }

    #[test]
    fn dead_workers_and_unit_supervisors_exit_70() {
        let dns = AppError::Component {
            component: "dns",
            source: dns::DnsError::WorkerDied {
                name: "dns-udp-0".into(),
                how: "returned".into(),
            }
            .into(),
        };
        let up = AppError::Supervisor(supervisor::SupervisorError::UnitDied {
            unit: "lb".into(),
            message: "panicked: x".into(),
        });
        assert_eq!(dns.exit_code(), EXIT_SOFTWARE);
        assert_eq!(up.exit_code(), EXIT_SOFTWARE);
        assert_eq!(
            AppError::Component {
                component: "lb",
                source: lb::LbError::TaskEnded("routing table").into(),
            }
            .exit_code(),
            1,
            "a task that ends is a restartable failure, not a bug"
        );
    }

    #[test]
    fn status_exits_1_when_not_ready_and_69_when_it_gets_no_status() {
        let not_ready = AppError::NotReady("lb (waiting for Consul's leader before starting)".into());
        assert_eq!(not_ready.exit_code(), 1);
        assert!(not_ready.to_string().contains("lb (waiting"), "{not_ready}");
        let unreachable = AppError::Supervisor(supervisor::SupervisorError::Status {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000)),
            problem: "nothing is listening there".into(),
        });
        assert_eq!(unreachable.exit_code(), EXIT_UNAVAILABLE);
        assert_ne!(EXIT_UNAVAILABLE, EXIT_NOT_READY);
    }
}
