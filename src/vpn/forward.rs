//! Forwarding for `vpn.routes`: the host kernel routes packets from peers to
//! the container networks and back, so `net.ipv4.ip_forward` must be 1 (in the
//! vpn's network namespace). Optional masquerading (iptables, else nft) hides
//! the tunnel subnet from networks that have no route back to it.

use std::process::Command;

use crate::config::VpnConfig;

use super::VpnError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A masquerade rule to remove at shutdown.
#[derive(Debug)]
pub struct Masquerade {
    delete: Vec<String>,
    program: &'static str,
}

impl Masquerade {
    /// Removes the rule.
    pub fn remove(self) {
        let _ = Command::new(self.program).args(&self.delete).status();
    }
}

/// Turns forwarding on when there are routes, and adds the masquerade rule when
/// asked for.
pub fn enable(config: &VpnConfig) -> Result<Option<Masquerade>, VpnError> {
    if config.routes.is_empty() {
        return Ok(None);
    }
    let on = std::fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1");
    if !on {
        std::fs::write(IP_FORWARD, "1\n").map_err(VpnError::Forwarding)?;
        tracing::info!("enabled net.ipv4.ip_forward for vpn.routes");
    }
    if !config.masquerade {
        return Ok(None);
    }
    let subnet = config.subnet().to_string();
    let rule = |op: &str| -> Vec<String> {
        [
            "-t",
            "nat",
            op,
            "POSTROUTING",
            "-s",
            &subnet,
            "!",
            "-o",
            &config.interface,
            "-j",
            "MASQUERADE",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    match Command::new("iptables").args(rule("-A")).status() {
        Ok(s) if s.success() => {
            return Ok(Some(Masquerade {
                delete: rule("-D"),
                program: "iptables",
            }));
        }
        Ok(s) => return Err(VpnError::Masquerade(format!("iptables exited with {s}"))),
        Err(_) => {}
    }
    // No iptables: a table of our own in nft, removed whole at shutdown.
    let table = format!("wayfinder_{}", config.interface.replace(['-', '.'], "_"));
    let script = format!(
        "add table ip {table}\nadd chain ip {table} post {{ type nat hook postrouting priority 100 ; }}\n\
         add rule ip {table} post ip saddr {subnet} oifname != \"{}\" masquerade\n",
        config.interface
    );
    let status = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().map(|mut i| i.write_all(script.as_bytes()));
            c.wait()
        });
    match status {
        Ok(s) if s.success() => Ok(Some(Masquerade {
            delete: vec!["delete".into(), "table".into(), "ip".into(), table],
            program: "nft",
        })),
        Ok(s) => Err(VpnError::Masquerade(format!("nft exited with {s}"))),
        Err(e) => Err(VpnError::Masquerade(format!(
            "vpn.masquerade needs iptables or nft, neither could run: {e}"
        ))),
    }
}
