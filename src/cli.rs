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
    /// Start everything this host's role needs (Consul, dns, lb, programs) and
    /// supervise it (replaces supervisord).
    Up {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask a running `wayfinder up` for its status and print it.
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
    /// Validate the configuration (file + environment), print it, and exit.
    Check {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}
