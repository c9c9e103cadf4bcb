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
    /// Validate the configuration (file + environment), print it, and exit.
    Check {
        /// Config file (default: ./wayfinder.toml if present, else built-in defaults).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}
