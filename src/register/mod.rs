//! The register component: the host's containers enter and leave Consul by
//! themselves, from their `SERVICE_*` environment and labels, as
//! registrator did for PanteraS (without its lost events, zombies and
//! rewrites).
//!
//! ```text
//!  Docker (bollard) ──events, inspect──▶ registrar ──diff──▶ Consul agent (only differences)
//!     docker.rs: facts and events          │                  agent.rs: owned services, writes
//!     conventions.rs + plan.rs: what each container should have (pure)
//!  component.rs: the seam (bind, run, metrics, status, page); settings.rs: [register]
//! ```
//!
//! Consul holds exactly the serving containers of this host: every service
//! written carries its owner (Docker engine, host, container) in Meta; a
//! full comparison at start, after a lost event stream and every
//! `register.resync` removes what Wayfinder owns and no container backs,
//! and never touches what it does not own.

pub mod agent;
pub mod component;
pub mod conventions;
pub mod docker;
pub mod plan;
pub mod registrar;
pub mod settings;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::consul::{ConsulError, ConsulHttp};
use settings::RegisterConfig;

/// Why the register component stopped (it retries Docker and Consul
/// failures by itself; these reach the supervisor only when it cannot).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A Docker request failed.
    #[error("docker at {endpoint}: {what}: {source}")]
    Docker {
        /// The endpoint.
        endpoint: String,
        /// What was asked.
        what: &'static str,
        /// The cause.
        source: bollard::errors::Error,
    },
    /// Docker did not answer in time.
    #[error("docker at {endpoint} did not answer {what} within {:?}", docker::DOCKER_TIMEOUT)]
    DockerTimeout {
        /// The endpoint.
        endpoint: String,
        /// What was asked.
        what: &'static str,
    },
    /// A Consul request failed.
    #[error(transparent)]
    Consul(ConsulError),
}

/// Runs the register component until `shutdown`: follows the Docker daemon
/// at `config.docker` and keeps the local Consul agent (through `consul`)
/// equal to its serving containers. `host_ip`: this host's address (host
/// address mode); `host_name`: this host's name (service IDs, Meta).
pub async fn run(
    config: &RegisterConfig,
    consul: ConsulHttp,
    host_ip: Option<std::net::IpAddr>,
    host_name: String,
    stats: Arc<registrar::Stats>,
    shutdown: CancellationToken,
) -> Result<(), RegisterError> {
    registrar::run(config.clone(), consul, host_ip, host_name, stats, shutdown).await
}
