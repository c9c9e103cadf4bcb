//! HTTPS for the lb: certificates from PEM files, chosen by SNI, re-read when the
//! files change.
//!
//! ```text
//!  [lb] certs (files, dirs of *.pem) ──load──▶ CertIndex {exact, wildcard, default}
//!        ▲  polled every CERT_POLL (path, mtime, size)        │ ArcSwap
//!        └── a broken file keeps the last good index          ▼
//!  TLS ClientHello ──SNI──▶ SniResolver::resolve ──▶ CertifiedKey
//! ```
//!
//! A PEM file holds a certificate chain and its private key, as HAProxy's
//! `crt` files (and PanteraS's `HAPROXY_SSL` setup) do. The names a certificate
//! serves are its DNS subject alternative names, or its common name when it has
//! none. ALPN offers `h2` and `http/1.1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
pub const CERT_POLL: Duration = Duration::from_secs(1);

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file's content is not a usable certificate and key.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Nothing to serve.
    #[error("no *.pem certificate files found in {0}")]
    Empty(String),
}

/// What the status page shows about one loaded certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// The file it came from.
    pub file: PathBuf,
    /// The names it serves.
    pub names: Vec<String>,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// SHA-256 of the certificate, `AB:CD:...`.
    pub sha256: String,
    /// The lb's own self-signed certificate (HTTPS on and no `lb.certs`), not
    /// one the operator configured.
    pub self_signed: bool,
}

/// The certificates in force, indexed by the names they serve.
#[derive(Debug, Default)]
pub struct CertIndex {
    /// Exact names, lower-case.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` certificates by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with an unknown name: the first certificate.
    default: Option<Arc<CertifiedKey>>,
    /// For the status page.
    pub certs: Vec<CertInfo>,
}

impl CertIndex {
    /// The certificate for `server_name` (case-insensitive).
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = server_name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).cloned().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).cloned()
            })
        });
        found.or_else(|| self.default.clone())
    }

    /// Loads every PEM file named by `paths` (directories: their `*.pem`, sorted).
    pub fn load(paths: &[PathBuf]) -> Result<Self, CertError> {
        let files = pem_files(paths)?;
        if files.is_empty() {
            let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(CertError::Empty(list.join(", ")));
        }
        let mut index = CertIndex::default();
        for (file, _) in files {
            let (key, info) = load_pem(&file)?;
            let key = Arc::new(key);
            for name in &info.names {
                match name.strip_prefix("*.") {
                    Some(parent) => index.wildcard.entry(parent.to_string()).or_insert_with(|| key.clone()),
                    None => index.exact.entry(name.clone()).or_insert_with(|| key.clone()),
                };
            }
            index.default.get_or_insert_with(|| key.clone());
            index.certs.push(info);
        }
        Ok(index)
    }
}

/// A certificate file and what identifies its current content (mtime, size).
type StampedFile = (PathBuf, Option<(SystemTime, u64)>);

/// The files `paths` stand for, with what identifies their current content.
fn pem_files(paths: &[PathBuf]) -> Result<Vec<StampedFile>, CertError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Read { path, source }
    };
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(read_err(path))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(read_err(path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pem") && p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files
        .into_iter()
        .map(|f| {
            let stamp = std::fs::metadata(&f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (f, stamp)
        })
        .collect())
}

/// One PEM file: its chain and key, checked to belong together.
fn load_pem(path: &Path) -> Result<(CertifiedKey, CertInfo), CertError> {
    let invalid = |problem: String| CertError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let pem = std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("bad PEM certificate: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| invalid("no CERTIFICATE block in the file".into()))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid(format!("no usable PRIVATE KEY block: {e}")))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| invalid(format!("unsupported private key: {e}")))?;
    let (names, not_after) = leaf_names(leaf).map_err(invalid)?;
    let sha256 = fingerprint(leaf.as_ref());
    let key = CertifiedKey::new(chain, signing_key);
    key.keys_match()
        .map_err(|e| invalid(format!("the private key does not belong to the certificate: {e}")))?;
    Ok((
        key,
        CertInfo {
            file: path.to_path_buf(),
            names,
            not_after,
            sha256,
            self_signed: false,
        },
    ))
}

/// The DNS names a leaf certificate serves (SANs, else the CN), lower-case, and
/// its expiry.
fn leaf_names(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, String), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| format!("bad certificate: {e}"))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName: {e}")),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let not_after = cert
        .validity()
        .not_after
        .to_rfc2822()
        .unwrap_or_else(|_| cert.validity().not_after.to_string());
    Ok((names, not_after))
}

/// Chooses the certificate by SNI from the index in force.
#[derive(Debug)]
pub struct SniResolver {
    index: ArcSwap<CertIndex>,
}

impl SniResolver {
    /// A resolver over a loaded index.
    pub fn new(index: CertIndex) -> Arc<Self> {
        Arc::new(Self {
            index: ArcSwap::from_pointee(index),
        })
    }

    /// The index in force (for the status page).
    pub fn current(&self) -> Arc<CertIndex> {
        self.index.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.index.load().lookup(hello.server_name())
    }
}

/// The rustls server configuration: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Re-reads the certificates whenever a file changes (added, removed, touched);
/// a set that fails to load is logged and the last good one stays.
pub async fn watch(paths: Vec<PathBuf>, resolver: Arc<SniResolver>, shutdown: CancellationToken) {
    let mut seen = pem_files(&paths).ok();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CERT_POLL) => {}
        }
        let now = pem_files(&paths).ok();
        if now == seen {
            continue;
        }
        seen = now;
        match CertIndex::load(&paths) {
            Ok(index) => {
                let names: Vec<&str> = index
                    .certs
                    .iter()
                    .flat_map(|c| c.names.iter().map(String::as_str))
                    .collect();
                tracing::info!(certificates = index.certs.len(), names = ?names, "lb: certificates reloaded");
                resolver.index.store(Arc::new(index));
            }
            Err(error) => {
                tracing::error!(%error, "lb: certificates not reloaded; the previous ones stay in use");
            }
        }
    }
}

/// SHA-256 of `der` as colon-separated upper-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, file: &str, names: &[&str]) -> PathBuf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).expect("rcgen");
        let path = dir.join(file);
        std::fs::write(
            &path,
            format!("{}{}", cert.cert.pem(), cert.signing_key.serialize_pem()),
        )
        .expect("write");
        path
    }

    fn names_of(key: &CertifiedKey) -> Vec<String> {
        leaf_names(key.end_entity_cert().expect("leaf")).expect("names").0
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_cert(dir.path(), "a.pem", &["a.example.com"]);
        write_cert(dir.path(), "b.pem", &["*.apps.example.com", "B.example.com"]);
        let index = CertIndex::load(&[dir.path().to_path_buf()]).expect("load");
        let pick = |n: Option<&str>| names_of(&index.lookup(n).expect("a cert"));
        assert_eq!(pick(Some("a.example.com")), ["a.example.com"]);
        assert_eq!(pick(Some("b.example.com.")), ["*.apps.example.com", "b.example.com"]);
        assert_eq!(
            pick(Some("WEB.apps.example.com")),
            ["*.apps.example.com", "b.example.com"]
        );
        // A wildcard covers one label only; anything unknown gets the first file.
        assert_eq!(pick(Some("x.web.apps.example.com")), ["a.example.com"]);
        assert_eq!(pick(None), ["a.example.com"]);
        assert_eq!(index.certs.len(), 2);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let only_cert = dir.path().join("nokey.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("rcgen");
        std::fs::write(&only_cert, cert.cert.pem()).expect("write");
        let e = CertIndex::load(std::slice::from_ref(&only_cert))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nokey.pem") && e.contains("PRIVATE KEY"), "{e}");

        let other = rcgen::generate_simple_self_signed(vec!["y".into()]).expect("rcgen");
        let mismatched = dir.path().join("mismatch.pem");
        std::fs::write(
            &mismatched,
            format!("{}{}", cert.cert.pem(), other.signing_key.serialize_pem()),
        )
        .expect("write");
        let e = CertIndex::load(std::slice::from_ref(&mismatched))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");

        let empty = tempfile::tempdir().expect("tempdir");
        let e = CertIndex::load(&[empty.path().to_path_buf()]).unwrap_err().to_string();
        assert!(e.contains("no *.pem"), "{e}");
        let e = CertIndex::load(&[dir.path().join("missing.pem")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
