//! The peer registry: `<dir>/peers.toml`, one `[[peer]]` table per laptop
//! (name, public key, tunnel address, extra allowed networks).
//!
//! Writers (`wayfinder vpn peer add|remove`, the control socket) take an
//! exclusive `flock` on `<dir>/peers.lock`, read, change, and replace the file
//! atomically (a 0600 temp file renamed over it), so concurrent CLI calls never
//! lose each other's peers and the running server never reads half a file. The
//! server polls the file and applies only what changed (see `super::VpnState`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use super::VpnError;
use super::keys;

/// File name of the registry inside the vpn directory.
pub const PEERS_FILE: &str = "peers.toml";
const LOCK_FILE: &str = "peers.lock";

/// One peer as stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRecord {
    /// The operator's name for it (unique).
    pub name: String,
    /// Its public key, base64.
    pub public_key: String,
    /// Its tunnel address (a /32 it may always use as source).
    pub address: Ipv4Addr,
    /// Further networks it may use as source and that are routed to it.
    /// Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// When it was added (Unix seconds). Default 0.
    #[serde(default)]
    pub created: u64,
}

impl PeerRecord {
    /// Every network the peer owns: its address, then `allowed_ips`.
    pub fn networks(&self) -> Vec<IpNet> {
        let own = IpNet::V4(Ipv4Net::from(self.address));
        let mut nets = vec![own];
        nets.extend(self.allowed_ips.iter().filter(|n| **n != own).copied());
        nets
    }

    /// Its public key as bytes, if the stored text is a key.
    pub fn key(&self) -> Option<[u8; 32]> {
        keys::from_base64(&self.public_key)
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    #[serde(default, rename = "peer")]
    peers: Vec<PeerRecord>,
}

/// The registry in one directory.
#[derive(Debug, Clone)]
pub struct PeerStore {
    dir: PathBuf,
}

impl PeerStore {
    /// The registry in `dir` (created 0700 when missing).
    pub fn open(dir: &Path) -> Result<Self, VpnError> {
        keys::ensure_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The registry file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(PEERS_FILE)
    }

    /// Reads every peer; a missing file is an empty registry.
    pub fn load(&self) -> Result<Vec<PeerRecord>, VpnError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(VpnError::io("read the peer registry", &path, source)),
        };
        parse(&text).map_err(|problem| VpnError::State { path, problem })
    }

    /// Runs `change` on the peers under the registry lock and writes the result
    /// back when it succeeds.
    pub fn update<T>(&self, change: impl FnOnce(&mut Vec<PeerRecord>) -> Result<T, VpnError>) -> Result<T, VpnError> {
        let _lock = self.lock()?;
        let mut peers = self.load()?;
        let out = change(&mut peers)?;
        self.write(&peers)?;
        Ok(out)
    }

    fn lock(&self) -> Result<File, VpnError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| VpnError::io("open the registry lock", &path, source))?;
        // SAFETY: flock on a descriptor we own; released when `file` closes.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(VpnError::io(
                "lock the peer registry",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }

    fn write(&self, peers: &[PeerRecord]) -> Result<(), VpnError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{PEERS_FILE}.{}", std::process::id()));
        let mut text =
            String::from("# WireGuard peers of `wayfinder vpn`; edit with `wayfinder vpn peer add|remove`.\n");
        text.push_str(
            &toml::to_string(&PeerFile { peers: peers.to_vec() }).map_err(|e| VpnError::State {
                path: path.clone(),
                problem: format!("could not render: {e}"),
            })?,
        );
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| fs::rename(&tmp, &path));
        written.map_err(|source| {
            let _ = fs::remove_file(&tmp);
            VpnError::io("write the peer registry", &path, source)
        })
    }
}

/// Parses registry text, checking names and keys are valid and unique.
pub fn parse(text: &str) -> Result<Vec<PeerRecord>, String> {
    let file: PeerFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    for (i, p) in file.peers.iter().enumerate() {
        if p.key().is_none() {
            return Err(format!(
                "peer `{}`: `{}` is not a base64 public key",
                p.name, p.public_key
            ));
        }
        if let Some(other) = file.peers[..i]
            .iter()
            .find(|o| o.name == p.name || o.public_key == p.public_key || o.address == p.address)
        {
            return Err(format!(
                "peers `{}` and `{}` share a name, key or address",
                other.name, p.name
            ));
        }
    }
    Ok(file.peers)
}

/// A peer name: letters, digits, `-`, `_`, `.`, `@`; 1-64 characters.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// The lowest address of `subnet` that is neither the network, the broadcast,
/// the server's own address nor taken by a peer.
pub fn next_free_address(server: Ipv4Net, peers: &[PeerRecord]) -> Option<Ipv4Addr> {
    server
        .trunc()
        .hosts()
        .find(|a| *a != server.addr() && !peers.iter().any(|p| p.address == *a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, last: u8) -> PeerRecord {
        PeerRecord {
            name: name.into(),
            public_key: keys::to_base64(&[last; 32]),
            address: Ipv4Addr::new(10, 200, 0, last),
            allowed_ips: vec![],
            created: 0,
        }
    }

    #[test]
    fn addresses_skip_server_and_taken_ones() {
        let server: Ipv4Net = "10.200.0.1/24".parse().unwrap();
        assert_eq!(next_free_address(server, &[]), Some(Ipv4Addr::new(10, 200, 0, 2)));
        let taken = [record("a", 2), record("b", 4)];
        assert_eq!(next_free_address(server, &taken), Some(Ipv4Addr::new(10, 200, 0, 3)));
        let tiny: Ipv4Net = "10.0.0.1/30".parse().unwrap();
        assert_eq!(next_free_address(tiny, &[]), Some(Ipv4Addr::new(10, 0, 0, 2)));
        let mut full = record("x", 2);
        full.address = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(next_free_address(tiny, &[full]), None);
    }

    #[test]
    fn registry_round_trips_atomically_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().unwrap();
        let store = PeerStore::open(&temp.path().join("vpn")).unwrap();
        assert!(store.load().unwrap().is_empty());
        store
            .update(|p| {
                p.push(record("a", 2));
                Ok(())
            })
            .unwrap();
        store
            .update(|p| {
                p.push(record("b", 3));
                Ok(())
            })
            .unwrap();
        assert_eq!(store.load().unwrap(), vec![record("a", 2), record("b", 3)]);
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A failed change leaves the file as it was.
        let e = store.update(|p| {
            p.clear();
            Err::<(), _>(VpnError::Peer("no".into()))
        });
        assert!(e.is_err());
        assert_eq!(store.load().unwrap().len(), 2);
    }

    #[test]
    fn broken_registries_are_explained() {
        assert!(parse("[[peer]]\nname = \"a\"\n").unwrap_err().contains("missing"));
        let bad_key = "[[peer]]\nname = \"a\"\npublic_key = \"x\"\naddress = \"10.0.0.2\"\n";
        assert!(parse(bad_key).unwrap_err().contains("not a base64"));
        let k = keys::to_base64(&[1; 32]);
        let dup = format!(
            "[[peer]]\nname = \"a\"\npublic_key = \"{k}\"\naddress = \"10.0.0.2\"\n\
             [[peer]]\nname = \"a\"\npublic_key = \"{}\"\naddress = \"10.0.0.3\"\n",
            keys::to_base64(&[2; 32])
        );
        assert!(parse(&dup).unwrap_err().contains("share"));
        assert!(valid_name("laptop-1") && !valid_name("a b") && !valid_name(""));
    }
}
