//! What a peer may reach through the host: the tunnel address and `vpn.routes`,
//! nothing else.
//!
//! A peer controls its own config, so its `AllowedIPs` (what it sends into the
//! tunnel) are no limit: a laptop that adds `192.168.0.0/16` would otherwise
//! reach every network the host routes, and every address the host listens on.
//! The packet loop already drops a decrypted packet whose inner source is not
//! the sending peer's own (`device.rs`, device-wide table); this module limits
//! where such a packet may go once it is on the TUN interface.
//!
//! ```text
//!  table inet wayfinder_vpn_<interface>       (one per instance; nft tables are
//!    forward  iifname <tun>: established/related ─▶ accept    per network
//!             daddr in routes (not back to <tun>) ─▶ accept   namespace, and one
//!             sent to the tunnel address, DNATed (a port Docker publishes) ─▶ accept
//!             anything else (other networks, peer to peer) ─▶ drop   interface
//!    input    iifname <tun>: established/related, daddr tunnel address    name has
//!             or in routes ─▶ accept; other host addresses ─▶ drop        one owner)
//!    nat      (vpn.masquerade) saddr tunnel subnet, daddr in routes ─▶ masquerade
//! ```
//!
//! The table is replaced whole in one nft transaction at start (so a table a
//! crashed run left behind is gone in the same step) and deleted whole at stop.
//! Only packets that came in on our TUN interface are matched; every chain's
//! policy is accept, so nothing else on the host changes. Our drops are final
//! whatever other tables say; our accepts only end our own chains (docker's
//! rules still apply after them).
//!
//! The rules are installed even without `routes`: a docker host forwards
//! already (`net.ipv4.ip_forward = 1`), so a peer would otherwise reach every
//! docker network. `ip_forward` itself is turned on only for `routes`; it is a
//! host-wide switch, which is why the confinement matters.
//!
//! nft only, no iptables fallback: one atomic transaction for replace-or-create,
//! sets for the routes, and an inet table for IPv4 and IPv6 together. Without
//! nft the vpn refuses to start (naming the package) rather than run with peers
//! unconfined. The kernel side (nf_tables) is what Debian's default iptables
//! (iptables-nft, also docker's) uses already, so on such hosts only the
//! `nftables` package, the `nft` command, may be missing; an iptables copy of
//! these rules would be a second implementation to keep equal for no host we
//! know of.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::settings::VpnConfig;

use super::VpnError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Where `nft` is looked for when it is not on `PATH` (a non-root user's PATH
/// often lacks the sbin directories).
const NFT_FALLBACKS: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/local/sbin/nft"];
/// How to get `nft`, for the error when it is missing.
pub const NFT_INSTALL: &str = "install nftables (`apt-get install nftables`; scripts/install-deps.sh does)";

/// The nft table of the vpn on `interface`: `wayfinder_vpn_` and the name with
/// `_` doubled, `-` as `_h` and `.` as `_d`, so distinct interfaces never share
/// a table and any valid interface name gives a valid nft identifier.
pub fn table_name(interface: &str) -> String {
    let mut name = String::from("wayfinder_vpn_");
    for c in interface.chars() {
        match c {
            '_' => name.push_str("__"),
            '-' => name.push_str("_h"),
            '.' => name.push_str("_d"),
            c => name.push(c),
        }
    }
    name
}

/// The nft script that replaces (or creates) the table for `config`: the
/// first two commands make sure a table exists so that the delete cannot fail,
/// and nft applies the whole script as one transaction.
pub fn ruleset(config: &VpnConfig) -> String {
    let table = table_name(&config.interface);
    let tun = &config.interface;
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = config.routes.iter().partition(|n| matches!(n, IpNet::V4(_)));
    let set = |name: &str, kind: &str, nets: &[IpNet]| {
        let elements = if nets.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = nets.iter().map(|n| n.trunc().to_string()).collect();
            format!(" elements = {{ {} }};", list.join(", "))
        };
        format!("  set {name} {{ type {kind}; flags interval;{elements} }}\n")
    };
    let mut s = format!("add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n");
    s += &set("routes4", "ipv4_addr", &v4);
    s += &set("routes6", "ipv6_addr", &v6);
    s += &format!(
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"{tun}\" ct state established,related accept\n\
         \x20   iifname \"{tun}\" oifname != \"{tun}\" ip daddr @routes4 accept\n\
         \x20   iifname \"{tun}\" oifname != \"{tun}\" ip6 daddr @routes6 accept\n\
         \x20   iifname \"{tun}\" oifname != \"{tun}\" ct status dnat ct original ip daddr {address} accept comment \"a published port at the tunnel address\"\n\
         \x20   iifname \"{tun}\" counter drop comment \"not in vpn.routes\"\n  }}\n",
        address = config.address.addr()
    );
    s += &format!(
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"{tun}\" ct state established,related accept\n\
         \x20   iifname \"{tun}\" ip daddr {} accept\n\
         \x20   iifname \"{tun}\" ip daddr @routes4 accept\n\
         \x20   iifname \"{tun}\" ip6 daddr @routes6 accept\n\
         \x20   iifname \"{tun}\" counter drop comment \"not the tunnel address nor in vpn.routes\"\n  }}\n",
        config.address.addr()
    );
    if config.masquerade {
        // The input interface is unknown in postrouting: match the tunnel
        // subnet as source instead.
        s += &format!(
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   ip saddr {} ip daddr @routes4 oifname != \"{tun}\" masquerade\n  }}\n",
            config.subnet()
        );
    }
    s += "}\n";
    s
}

/// The first executable `program` in the directories of `path` (a `PATH`
/// value), else the first of `fallbacks` that exists.
fn find_program(program: &str, path: Option<&std::ffi::OsStr>, fallbacks: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| executable(p))
}

/// The `nft` program, or [`VpnError::NoNft`] naming the package.
pub fn nft_program() -> Result<PathBuf, VpnError> {
    find_program("nft", std::env::var_os("PATH").as_deref(), NFT_FALLBACKS).ok_or(VpnError::NoNft)
}

/// Why `nft` did not apply a script.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// It could not be started or waited for.
    #[error("could not run {program}: {source}")]
    Run {
        /// The `nft` program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// It refused the script.
    #[error("{program} exited with {status}: {message}")]
    Refused {
        /// The `nft` program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it wrote on stderr.
        message: String,
    },
}

/// Runs `nft -f -` with `script` on stdin; the error is nft's own message.
fn run_nft(program: &Path, script: &str) -> Result<(), NftError> {
    let run = |source| NftError::Run {
        program: program.display().to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows as nft's failure below.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(run)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            program: program.display().to_string(),
            status: out.status,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The installed table; deleted by [`Firewall::remove`], or when dropped on a
/// path that returned early.
#[derive(Debug)]
pub struct Firewall {
    nft: PathBuf,
    table: String,
    removed: bool,
}

impl Firewall {
    /// Turns `ip_forward` on when there are routes, then replaces the vpn's nft
    /// table (creating it, or the leftover of a crashed run) with the rules
    /// for `config`, with the `nft` of [`nft_program`]. Blocking: it runs
    /// `nft` once.
    pub fn install(config: &VpnConfig, nft: PathBuf) -> Result<Self, VpnError> {
        if !config.routes.is_empty() {
            let on = std::fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1");
            if !on {
                std::fs::write(IP_FORWARD, "1\n").map_err(VpnError::Forwarding)?;
                tracing::info!("enabled net.ipv4.ip_forward for vpn.routes");
            }
        }
        let table = table_name(&config.interface);
        run_nft(&nft, &ruleset(config)).map_err(|e| {
            VpnError::Firewall(format!(
                "could not install nft table inet {table} (needs CAP_NET_ADMIN): {e}"
            ))
        })?;
        tracing::info!(
            table = %format!("inet {table}"),
            routes = ?config.routes,
            masquerade = config.masquerade,
            "vpn peers confined to the tunnel address and vpn.routes"
        );
        Ok(Firewall {
            nft,
            table,
            removed: false,
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table (blocking: one `nft` run). A failure is logged: the
    /// next start replaces the table anyway.
    pub fn remove(mut self) {
        self.delete();
    }

    fn delete(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        if let Err(e) = run_nft(&self.nft, &format!("delete table inet {}\n", self.table)) {
            tracing::warn!(table = %self.table, error = %e, "could not remove the vpn's nft table; the next start replaces it");
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.delete();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> VpnConfig {
        let text = format!("[dns]\nupstreams = [\"192.0.2.1\"]\n[vpn]\n{extra}\n");
        let file =
            crate::config::parse(&text, "test.toml", &std::collections::HashMap::<String, String>::new()).unwrap();
        crate::config::validate(&file, "test.toml").unwrap().vpn
    }

    #[test]
    fn table_names_are_distinct_and_valid_identifiers() {
        assert_eq!(table_name("wf0"), "wayfinder_vpn_wf0");
        let names = ["wf-0", "wf_h0", "wf.0", "wf_d0", "wf__0", "wf_0"].map(table_name);
        for (i, a) in names.iter().enumerate() {
            assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{a}");
            for b in &names[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    /// Every tunnel packet is matched by input interface; routes go into sets;
    /// the drop ends both filter chains; masquerade only towards routes and only
    /// when asked for; the script replaces the table atomically.
    #[test]
    fn ruleset_confines_the_tunnel_to_its_address_and_routes() {
        let c = config("interface = \"wf-t\"\nroutes = [\"172.17.0.0/16\", \"10.1.2.3/24\", \"fd00::/64\"]");
        let s = ruleset(&c);
        let table = "wayfinder_vpn_wf_ht";
        assert!(
            s.starts_with(&format!(
                "add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n"
            )),
            "{s}"
        );
        assert!(
            s.contains("set routes4 { type ipv4_addr; flags interval; elements = { 172.17.0.0/16, 10.1.2.0/24 }; }"),
            "{s}"
        );
        assert!(
            s.contains("set routes6 { type ipv6_addr; flags interval; elements = { fd00::/64 }; }"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"wf-t\" oifname != \"wf-t\" ip daddr @routes4 accept"),
            "{s}"
        );
        assert!(s.contains("iifname \"wf-t\" ip daddr 10.200.0.1 accept"), "{s}");
        assert!(
            s.contains("iifname \"wf-t\" oifname != \"wf-t\" ct status dnat ct original ip daddr 10.200.0.1 accept"),
            "a port published at the tunnel address (Docker's DNAT) is reached: {s}"
        );
        assert_eq!(s.matches("counter drop").count(), 2, "{s}");
        assert_eq!(s.matches("policy accept").count(), 2, "{s}");
        for line in s.lines().filter(|l| l.contains(" accept") && !l.contains("policy")) {
            assert!(
                line.contains("iifname \"wf-t\""),
                "a rule not limited to the tunnel: {line}"
            );
        }
        assert!(!s.contains("masquerade"), "{s}");

        let m = ruleset(&config("masquerade = true\nroutes = [\"172.17.0.0/16\"]"));
        assert!(
            m.contains("ip saddr 10.200.0.0/24 ip daddr @routes4 oifname != \"wf0\" masquerade"),
            "{m}"
        );

        // No routes: empty sets (no `elements`), the rules are still there.
        let none = ruleset(&config(""));
        assert!(
            none.contains("set routes4 { type ipv4_addr; flags interval; }"),
            "{none}"
        );
        assert_eq!(none.matches("counter drop").count(), 2, "{none}");
    }

    #[test]
    fn a_missing_nft_is_found_or_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_program("nft", Some(dir.path().as_os_str()), &[]), None);
        let fake = dir.path().join("nft");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        assert_eq!(
            find_program("nft", Some(dir.path().as_os_str()), &[]),
            None,
            "not executable"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_program("nft", Some(dir.path().as_os_str()), &[]),
            Some(fake.clone())
        );
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            find_program("nft", Some(elsewhere.path().as_os_str()), &[fake.to_str().unwrap()]),
            Some(fake),
            "the sbin fallbacks when PATH lacks it"
        );
        let message = VpnError::NoNft.to_string();
        assert!(message.contains("apt-get install nftables"), "{message}");
    }
}
