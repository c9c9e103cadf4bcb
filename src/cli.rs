//! Command line: `wayfinder <command> [-c FILE]`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Wayfinder: service discovery for container hosts: DNS for Consul services and a
/// Consul-fed load balancer, with more components arriving.
#[derive(Debug, Parser)]
#[command(name = "wayfinder", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the DNS server in the foreground (replaces dnsmasq).
    Dns {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the HTTP load balancer in the foreground (replaces HAProxy + consul-template).
    Lb {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Register this host's containers in Consul from their `SERVICE_*`
    /// environment and labels, in the foreground (replaces registrator).
    Register {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Start everything this host's role needs (Consul, dns, lb, programs) and
    /// supervise it (replaces supervisord).
    Up {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A PanteraS `restricted/` folder: its `common`, `host` and `overwrite`
        /// files are read in that order over the environment, as `generate_yml.sh` did.
        #[arg(long, value_name = "DIR")]
        restricted: Option<PathBuf>,
    },
    /// Ask a running `wayfinder up` for its status and print it.
    ///
    /// Exit status: 0 when every unit this host's role starts runs and is
    /// ready; 1 when `up` answered but one is not (they are named at the top
    /// and on stderr); 69 when no status came (nothing listening at the admin
    /// address, 401 without the token, not a status); 64 for a configuration
    /// error (the admin endpoint off, a bad config file).
    Status {
        /// Config file, for the admin address and token (default: ./wayfinder.toml if present).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Admin endpoint to ask, overriding the config file's `supervisor.admin`.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Print the raw JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show a running `wayfinder up` live, refreshed in place (like `htop`):
    /// units, Consul, services, traffic with rates, containers, vpn peers.
    /// The same figures as `/api/status`; Ctrl-C quits.
    Top {
        /// Config file, for the admin address and token (default: ./wayfinder.toml if present).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Admin endpoint to ask, overriding the config file's `supervisor.admin`.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Time between refreshes (`2s`, `500ms`; at least 200ms).
        #[arg(short = 'n', long, value_name = "DURATION", default_value = "2s", value_parser = parse_interval)]
        interval: std::time::Duration,
    },
    /// Run the WireGuard VPN server in the foreground, or manage its peers.
    Vpn {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        /// A peer command; without one, the server runs.
        #[command(subcommand)]
        action: Option<VpnCommand>,
    },
    /// Validate the configuration (file + environment), print it, and exit.
    Check {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A PanteraS `restricted/` folder, as for `up`.
        #[arg(long, value_name = "DIR")]
        restricted: Option<PathBuf>,
    },
}

/// `wayfinder vpn ...` commands.
#[derive(Debug, Subcommand)]
pub enum VpnCommand {
    /// Manage the laptops allowed in (changes reach a running server at once).
    Peer {
        /// What to do.
        #[command(subcommand)]
        command: PeerCommand,
    },
}

/// `wayfinder vpn peer ...`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Add a peer: new key pair, next free address; prints its wg-quick config.
    Add {
        /// The peer's name (letters, digits, `-`, `_`, `.`, `@`).
        name: String,
        /// Print the config as a QR code too (for the WireGuard mobile apps).
        #[arg(long)]
        qr: bool,
    },
    /// List peers: name, address, latest handshake, bytes.
    List,
    /// Remove a peer; its sessions end at once.
    Remove {
        /// The peer's name (or its public key).
        name: String,
    },
}

/// A refresh interval for `top`: a humantime duration of at least 200 ms.
fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(200) {
        return Err("at least 200ms".into());
    }
    Ok(d)
}
