//! The lb's own certificate for a first start: HTTPS on and no certificate
//! files configured, as PanteraS served its default `haproxy.pem` until the
//! operator put a real one in.
//!
//! ```text
//!  lb.ssl, lb.certs = [] ──▶ load_or_create(lb.state_dir, names)
//!     state_dir/selfsigned.pem (0600, dir 0700): same names, not expiring ─▶ used again
//!     missing, unreadable as ours, other names, expiring ─▶ made anew (rcgen, ECDSA P-256)
//!  ──▶ CertIndex (marked self-signed) ──▶ SniResolver, logged with its SHA-256
//! ```
//!
//! Generated once and kept, so a browser or a `curl --pinnedpubkey` that was
//! told to trust it keeps trusting it across restarts. Configured files always
//! win: with `lb.certs` set this file is not read at all (it stays on disk,
//! unused). The names are the host's (host name, `HOST_IP`, `localhost`,
//! `127.0.0.1`) and the wildcard domain's (`*.<HAPROXY_ADD_DOMAIN>`); a change
//! of them makes a new certificate, because the old one would not match.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::tls::{CertError, fingerprint};

/// The file in `lb.state_dir` (certificate then key, HAProxy's PEM layout).
pub const FILE: &str = "selfsigned.pem";

/// How long a generated certificate is valid.
const VALIDITY_YEARS: i32 = 10;

/// A kept certificate this close to its end is made anew at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The certificate in use: where it is and what identifies it.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// `state_dir/selfsigned.pem`.
    pub path: PathBuf,
    /// SHA-256 of the certificate (DER), as `AB:CD:...` (what `openssl x509
    /// -fingerprint -sha256` and browsers show).
    pub fingerprint: String,
    /// True when this start made it; false when a kept one is used again.
    pub created: bool,
}

/// The names the certificate is made for: the host name, `host_ip`,
/// `localhost`, `127.0.0.1`, and `*.<domain>` for the wildcard domain
/// (`add_domain` as the lb keeps it, `.apps.example.com`). Sorted, no repeats.
pub fn names(hostname: Option<&str>, host_ip: Option<std::net::IpAddr>, add_domain: Option<&str>) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if let Some(h) = hostname.map(str::trim).filter(|h| !h.is_empty()) {
        names.push(h.to_ascii_lowercase());
    }
    if let Some(ip) = host_ip {
        names.push(ip.to_string());
    }
    if let Some(domain) = add_domain.map(|d| d.trim_matches('.')).filter(|d| !d.is_empty()) {
        names.push(format!("*.{}", domain.to_ascii_lowercase()));
    }
    names.sort();
    names.dedup();
    names
}

/// The certificate in `dir` for `names`: the kept one when it still fits, else
/// a new one written there (the directory is created 0700, the file 0600).
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<SelfSigned, CertError> {
    let path = dir.join(FILE);
    ensure_dir(dir)?;
    if path.exists() {
        check_private(&path)?;
        match kept(&path, names) {
            Ok(fingerprint) => {
                return Ok(SelfSigned {
                    path,
                    fingerprint,
                    created: false,
                });
            }
            Err(why) => {
                tracing::info!(file = %path.display(), why = why.to_string(), "lb: making a new self-signed certificate")
            }
        }
    }
    let (pem, der) = generate(names).map_err(|problem| CertError::Invalid {
        path: path.clone(),
        problem: format!("could not make a self-signed certificate: {problem}"),
    })?;
    write_private(&path, pem.as_bytes())?;
    Ok(SelfSigned {
        path,
        fingerprint: fingerprint(&der),
        created: true,
    })
}

/// Why the kept certificate is not used again (logged as `why`).
#[derive(Debug, thiserror::Error)]
enum Unfit {
    #[error("unreadable: {0}")]
    Unreadable(std::io::Error),
    #[error("no certificate in it: {0}")]
    NoCertificate(rustls::pki_types::pem::Error),
    #[error("no private key in it: {0}")]
    NoKey(rustls::pki_types::pem::Error),
    #[error("bad certificate: {0}")]
    BadCertificate(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("made for {has:?}, now wanted for {wanted:?}")]
    OtherNames { has: Vec<String>, wanted: Vec<String> },
    #[error("it expires within 30 days")]
    Expiring,
}

/// The kept file's fingerprint when it is one of ours for exactly `names` and
/// not about to expire; else why not.
fn kept(path: &Path, names: &[String]) -> Result<String, Unfit> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = fs::read(path).map_err(Unfit::Unreadable)?;
    let der = CertificateDer::from_pem_slice(&pem).map_err(Unfit::NoCertificate)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem).map_err(Unfit::NoKey)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(Unfit::BadCertificate)?;
    let mut has: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                x509_parser::extensions::GeneralName::IPAddress(b) => ip_of(b).map(|ip| ip.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    has.sort();
    has.dedup();
    if has != names {
        return Err(Unfit::OtherNames {
            has,
            wanted: names.to_vec(),
        });
    }
    let ends = UNIX_EPOCH + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    if ends < SystemTime::now() + RENEW_BEFORE {
        return Err(Unfit::Expiring);
    }
    Ok(fingerprint(der.as_ref()))
}

fn ip_of(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => Some(<[u8; 4]>::try_from(bytes).ok()?.into()),
        16 => Some(<[u8; 16]>::try_from(bytes).ok()?.into()),
        _ => None,
    }
}

/// A new certificate and key for `names`: (PEM of both, certificate DER).
fn generate(names: &[String]) -> Result<(String, Vec<u8>), rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "Wayfinder");
    let host = names
        .iter()
        .find(|n| n.parse::<std::net::IpAddr>().is_err() && *n != "localhost" && !n.starts_with("*."))
        .map_or("localhost", String::as_str);
    dn.push(rcgen::DnType::CommonName, format!("wayfinder self-signed ({host})"));
    params.distinguished_name = dn;
    // From the start of this year (a clock a little behind still accepts it).
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let year = 1970 + i32::try_from(days * 400 / 146_097).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALIDITY_YEARS, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((format!("{}{}", cert.pem(), key.serialize_pem()), cert.der().to_vec()))
}

/// `dir` exists with mode 0700: made so, or set so while it holds no
/// certificate yet (as the vpn does with its state); one that holds our key
/// with a loose mode is refused: someone may have read the key.
fn ensure_dir(dir: &Path) -> Result<(), CertError> {
    let io = |source| CertError::Read {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        tracing::info!(dir = %dir.display(), "lb: state directory created (mode 700)");
    }
    let mode = fs::metadata(dir).map_err(io)?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if dir.join(FILE).exists() {
        return Err(CertError::Invalid {
            path: dir.to_path_buf(),
            problem: format!(
                "the directory holds the lb's private key but has mode {:o}; run `chmod 700 {}`",
                mode & 0o777,
                dir.display()
            ),
        });
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    tracing::info!(dir = %dir.display(), was = format!("{:o}", mode & 0o777), "lb: state directory holds no key yet; set to mode 700");
    Ok(())
}

/// A kept key file must be 0600 (or stricter).
fn check_private(path: &Path) -> Result<(), CertError> {
    let mode = fs::metadata(path)
        .map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CertError::Invalid {
            path: path.to_path_buf(),
            problem: format!(
                "the private key is readable by group or others (mode {:o}); run `chmod 600 {}`",
                mode & 0o777,
                path.display()
            ),
        });
    }
    Ok(())
}

/// Writes `data` to `path` as 0600, atomically (a temporary file renamed over it).
fn write_private(path: &Path, data: &[u8]) -> Result<(), CertError> {
    let tmp = path.with_extension("pem.tmp");
    let io = |source| CertError::Read {
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(data).and_then(|()| file.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn names_cover_the_host_and_the_wildcard_domain() {
        let ip = "10.1.2.3".parse().ok();
        assert_eq!(
            names(Some("Node-1\n"), ip, Some(".Apps.example.com")),
            ["*.apps.example.com", "10.1.2.3", "127.0.0.1", "localhost", "node-1"]
        );
        assert_eq!(names(None, None, None), ["127.0.0.1", "localhost"]);
    }

    #[test]
    fn made_once_private_kept_and_made_anew_for_other_names() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state/lb");
        let wanted = names(Some("host1"), "10.0.0.5".parse().ok(), Some(".apps.example.com"));
        let first = load_or_create(&dir, &wanted).unwrap();
        assert!(first.created);
        assert_eq!(first.path, dir.join(FILE));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&first.path), 0o600);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1, "{}", first.fingerprint);

        // The lb's own loader takes it, with every name.
        let index = crate::lb::tls::CertIndex::load(std::slice::from_ref(&first.path)).unwrap();
        assert!(index.lookup(Some("web.apps.example.com")).is_some());
        let info = &index.certs[0];
        assert!(info.names.contains(&"*.apps.example.com".to_string()), "{info:?}");
        assert!(info.names.contains(&"host1".to_string()), "{info:?}");

        // The next start uses it again.
        let again = load_or_create(&dir, &wanted).unwrap();
        assert!(!again.created);
        assert_eq!(again.fingerprint, first.fingerprint);
        assert_eq!(fs::read(&again.path).unwrap(), fs::read(&first.path).unwrap());

        // Another HOST_IP: the old certificate would not match; a new one.
        let moved = names(Some("host1"), "10.0.0.6".parse().ok(), Some(".apps.example.com"));
        let new = load_or_create(&dir, &moved).unwrap();
        assert!(new.created && new.fingerprint != first.fingerprint);

        // A file that is not ours any more (garbage): made anew, not an error.
        fs::write(&new.path, "garbage").unwrap();
        assert!(load_or_create(&dir, &moved).unwrap().created);
    }

    #[test]
    fn loose_modes_are_fixed_while_no_key_exists_and_refused_after() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("lb");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let wanted = names(None, None, None);
        let made = load_or_create(&dir, &wanted).unwrap();
        assert_eq!(mode(&dir), 0o700, "a directory without a key is made private");

        fs::set_permissions(&made.path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&dir, &wanted).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(&made.path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let e = load_or_create(&dir, &wanted).unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }
}
