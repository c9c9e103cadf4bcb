//! The WireGuard control socket (the cross-platform UAPI that `wg` speaks), at
//! `/var/run/wireguard/<interface>.sock`, so `wg show` and `wg set` work as with
//! wireguard-go.
//!
//! `get=1` reports the interface (`private_key`, which is why the socket is
//! 0600 and bound in a private directory before it is moved into place) and
//! each peer with its last handshake in Unix time, as wg(8) expects. `set=1`
//! accepts the peer changes an operator makes with `wg set`: `remove`,
//! `replace_allowed_ips`, `allowed_ip`; they are applied live and written to the
//! peer registry, so they survive a restart. Interface keys and ports are not
//! settable (they come from the config and `server.key`): errno 22.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{VpnError, VpnState, keys};

/// Where wg(8) looks for userspace interfaces.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest request we read (a `set` for many allowed IPs stays far below).
const MAX_REQUEST: usize = 1 << 20;

/// The socket path of `interface`.
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// Binds the control socket for `interface` with mode 0600.
pub fn bind(interface: &str) -> Result<UnixListener, VpnError> {
    let path = socket_path(interface);
    let fail = |problem: String| VpnError::Uapi {
        path: path.clone(),
        problem,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(SOCKET_DIR)
        .map_err(|e| fail(format!("could not create {SOCKET_DIR}: {e}")))?;
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(fail(format!(
                "another process serves interface {interface}; choose another vpn.interface"
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    // Bind inside a private directory and move the socket into place only once
    // it is 0600: nobody can connect in between and read the private key.
    let private = Path::new(SOCKET_DIR).join(format!(".wayfinder-{}-{interface}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| fail(format!("could not create {}: {e}", private.display())))?;
    let tmp = private.join("uapi.sock");
    let bound = UnixListener::bind(&tmp)
        .and_then(|l| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map(|_| l))
        .and_then(|l| std::fs::rename(&tmp, &path).map(|_| l))
        .and_then(|l| l.set_nonblocking(true).map(|_| l));
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(|e| fail(e.to_string()))
}

/// Removes the socket file (at shutdown).
pub fn unlink(interface: &str) {
    let _ = std::fs::remove_file(socket_path(interface));
}

/// Answers control connections until shutdown.
pub async fn serve(listener: UnixListener, state: Arc<VpnState>, shutdown: CancellationToken, tasks: TaskTracker) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "vpn control socket unusable; wg show will not work");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(stream, state) => {}
            }
        });
    }
}

async fn connection(stream: tokio::net::UnixStream, state: Arc<VpnState>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut request: Vec<String> = Vec::new();
    let mut size = 0;
    while let Some(line) = lines.next_line().await? {
        if !line.is_empty() {
            size += line.len();
            if size > MAX_REQUEST {
                return Ok(());
            }
            request.push(line);
            continue;
        }
        let Some(first) = request.first() else { continue };
        let reply = match first.as_str() {
            "get=1" => get(&state),
            "set=1" => {
                let body = std::mem::take(&mut request);
                let s = state.clone();
                let errno = tokio::task::spawn_blocking(move || set(&s, &body[1..]))
                    .await
                    .unwrap_or(5);
                format!("errno={errno}\n\n")
            }
            _ => "errno=22\n\n".to_string(),
        };
        request.clear();
        size = 0;
        write.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

/// The `get=1` reply.
fn get(state: &VpnState) -> String {
    let mut out = format!(
        "private_key={}\nlisten_port={}\n",
        keys::to_hex(&state.secret.to_bytes()),
        state.listen_port()
    );
    for p in state.peers() {
        let Some(key) = keys::from_base64(&p.public_key) else {
            continue;
        };
        out.push_str(&format!("public_key={}\n", keys::to_hex(&key)));
        if let Some(e) = p.endpoint {
            out.push_str(&format!("endpoint={e}\n"));
        }
        let when = p.last_handshake.unwrap_or_default();
        out.push_str(&format!(
            "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\ntx_bytes={}\nrx_bytes={}\n\
             persistent_keepalive_interval=0\nprotocol_version=1\n",
            when.as_secs(),
            when.subsec_nanos(),
            p.tx_bytes,
            p.rx_bytes
        ));
        for net in &p.allowed_ips {
            out.push_str(&format!("allowed_ip={net}\n"));
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// Applies a `set=1` body; returns the errno for the reply.
fn set(state: &VpnState, lines: &[String]) -> i32 {
    /// One peer's part of the request.
    struct Change {
        key: [u8; 32],
        remove: bool,
        replace: bool,
        allowed: Vec<IpNet>,
        touched_allowed: bool,
    }
    let mut changes: Vec<Change> = Vec::new();
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return 22;
        };
        match (key, changes.last_mut()) {
            ("public_key", _) => match keys::from_hex(value) {
                Some(k) => changes.push(Change {
                    key: k,
                    remove: false,
                    replace: false,
                    allowed: Vec::new(),
                    touched_allowed: false,
                }),
                None => return 22,
            },
            ("remove", Some(c)) => c.remove = value == "true",
            ("replace_allowed_ips", Some(c)) => {
                c.replace = value == "true";
                c.touched_allowed = true;
            }
            ("allowed_ip", Some(c)) => match value.parse::<IpNet>() {
                Ok(n) => {
                    c.allowed.push(n);
                    c.touched_allowed = true;
                }
                Err(_) => return 22,
            },
            // Accepted and ignored: the endpoint is learnt from authenticated
            // packets, keepalives are the client's business.
            ("endpoint" | "persistent_keepalive_interval" | "protocol_version" | "update_only", Some(_)) => {}
            // An interface-level no-op `wg set` sends (`listen_port` equal to ours).
            ("listen_port", None) if value.parse::<u16>().ok() == Some(state.listen_port()) => {}
            _ => return 22,
        }
    }
    for c in changes {
        let allowed = c.touched_allowed.then(|| (c.allowed.clone(), c.replace));
        if let Err(e) = state.set_peer(&c.key, c.remove, allowed) {
            tracing::warn!(error = %e, "control socket change refused");
            return 22;
        }
    }
    0
}

/// Live figures of one peer, as the running server reports them.
#[derive(Debug, Clone, Default)]
pub struct LivePeer {
    /// Last endpoint.
    pub endpoint: Option<String>,
    /// Unix time of the latest handshake (0: none).
    pub last_handshake: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Asks the running server for its peers (keyed by base64 public key); None when
/// no server answers on the socket.
pub fn query(interface: &str) -> Option<std::collections::HashMap<String, LivePeer>> {
    let mut stream = UnixStream::connect(socket_path(interface)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"get=1\n\n").ok()?;
    let mut peers = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in BufReader::new(stream).lines() {
        let line = line.ok()?;
        if line.is_empty() {
            break;
        }
        let (key, value) = line.split_once('=')?;
        match key {
            "public_key" => {
                let b64 = keys::to_base64(&keys::from_hex(value)?);
                peers.insert(b64.clone(), LivePeer::default());
                current = Some(b64);
            }
            "errno" if value != "0" => return None,
            _ => {
                let Some(peer) = current.as_ref().and_then(|c| peers.get_mut(c)) else {
                    continue;
                };
                match key {
                    "endpoint" => peer.endpoint = Some(value.to_string()),
                    "last_handshake_time_sec" => peer.last_handshake = value.parse().unwrap_or(0),
                    "rx_bytes" => peer.rx_bytes = value.parse().unwrap_or(0),
                    "tx_bytes" => peer.tx_bytes = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    Some(peers)
}

/// "3 s ago" style age of a Unix time, for `peer list`.
pub fn ago(unix_secs: u64) -> String {
    if unix_secs == 0 {
        return "never".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{} s ago", now.saturating_sub(unix_secs))
}
