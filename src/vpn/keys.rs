//! Keys on disk and on the wire: the server's private key in `<dir>/server.key`
//! (base64, 0600, in a 0700 directory), created on first use and refused when
//! anyone but the owner may read it; base64 and hex encodings of 32-byte keys.
//!
//! Keys are never logged: only public keys ever reach a log line or a message.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::TryRngCore;
use zeroize::Zeroize;

use super::VpnError;

/// File name of the server key inside the vpn directory.
pub const SERVER_KEY_FILE: &str = "server.key";

/// A new random private key from the operating system's generator.
pub fn generate() -> StaticSecret {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random generator works");
    let secret = StaticSecret::from(bytes);
    bytes.zeroize();
    secret
}

/// Base64 of a 32-byte key (the `wg` format).
pub fn to_base64(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Lower-case hex of a 32-byte key (the UAPI format).
pub fn to_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a base64 key.
pub fn from_base64(text: &str) -> Option<[u8; 32]> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Parses a hex key.
pub fn from_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// The public half of `secret`, as bytes.
pub fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// Creates `dir` with mode 0700 if it is missing. A directory that group or
/// others may enter is set to 0700 while it holds no server key yet (the `vpn/`
/// folder of a fresh clone comes from git with 0755 and only a README), and
/// refused once it holds one: someone may have read the key already.
pub fn ensure_dir(dir: &Path) -> Result<(), VpnError> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| VpnError::io("create the vpn directory", dir, source))?;
    }
    let mode = fs::metadata(dir)
        .map_err(|source| VpnError::io("read the vpn directory", dir, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        if !dir.join(SERVER_KEY_FILE).exists() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|source| VpnError::io("make the vpn directory private (0700)", dir, source))?;
            tracing::info!(dir = %dir.display(), was = format!("{:o}", mode & 0o777), "vpn: state directory holds no key yet; set to mode 700");
            return Ok(());
        }
        return Err(VpnError::State {
            path: dir.to_path_buf(),
            problem: format!(
                "the directory holds private keys but has mode {:o}; run `chmod 700 {}`",
                mode & 0o777,
                dir.display()
            ),
        });
    }
    Ok(())
}

/// Loads `<dir>/server.key`, creating it (0600) with a new key when missing.
pub fn load_or_create_server_key(dir: &Path) -> Result<StaticSecret, VpnError> {
    ensure_dir(dir)?;
    let path = dir.join(SERVER_KEY_FILE);
    if !path.exists() {
        let secret = generate();
        let mut text = to_base64(&secret.to_bytes());
        text.push('\n');
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()));
        text.zeroize();
        match written {
            Ok(()) => {
                tracing::info!(path = %path.display(), public_key = %to_base64(&public_of(&secret)), "created the vpn server key");
                return Ok(secret);
            }
            // Another `peer add` created it at the same moment: read theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(VpnError::io("write the server key", &path, source)),
        }
    }
    let mode = fs::metadata(&path)
        .map_err(|source| VpnError::io("read the server key", &path, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(VpnError::State {
            path: path.clone(),
            problem: format!(
                "the private key is readable by group or others (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        });
    }
    let mut text = fs::read_to_string(&path).map_err(|source| VpnError::io("read the server key", &path, source))?;
    let key = from_base64(&text);
    text.zeroize();
    match key {
        Some(mut bytes) => {
            let secret = StaticSecret::from(bytes);
            bytes.zeroize();
            Ok(secret)
        }
        None => Err(VpnError::State {
            path,
            problem: "is not a base64 WireGuard private key (32 bytes)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_encodings_round_trip() {
        let key = public_of(&generate());
        assert_eq!(from_base64(&to_base64(&key)), Some(key));
        assert_eq!(from_hex(&to_hex(&key)), Some(key));
        assert_eq!(from_base64("c2hvcnQ="), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn server_key_is_created_private_and_reloaded() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("vpn");
        let first = load_or_create_server_key(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SERVER_KEY_FILE)), 0o600);
        let again = load_or_create_server_key(&dir).unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());

        fs::set_permissions(dir.join(SERVER_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_server_key(&dir).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(dir.join(SERVER_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = load_or_create_server_key(&dir).err().unwrap().to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }

    /// A fresh clone's `vpn/` (0755, a README, no key) is made private and used.
    #[test]
    fn a_loose_directory_without_a_key_is_made_private() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("vpn");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("README.md"), "state lives here\n").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create_server_key(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.join(SERVER_KEY_FILE).exists());
    }
}
