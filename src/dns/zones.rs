//! Zones from `zones_dir`: RFC 1035 master files served authoritatively.
//!
//! ```text
//!  zones_dir/<origin>.zone ──parse (hickory txt parser)──▶ InMemoryZoneHandler
//!  every handler ──▶ Catalog ──ArcSwap──▶ lookups (a reload never blocks a query)
//!  poll (mtime/size) or SIGHUP ──▶ reload(): changed files re-parsed; a file that
//!  fails keeps its previous version and the error is logged with file and line
//! ```
//!
//! Only files named `<origin>.zone` are read; the origin is the file name without
//! the suffix (`example.com.zone` → `example.com.`); `$ORIGIN` inside the file may
//! still move names around.
//! Lookups go through hickory-server's `Catalog`, which does the authoritative work
//! (AA, NXDOMAIN vs NODATA, SOA in authority, CNAME chasing, wildcards, referrals).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use hickory_proto::rr::{LowerName, Name};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_proto::serialize::txt::Parser;
use hickory_server::net::NetError;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponse, ZoneHandler, ZoneType};
use parking_lot::Mutex;

/// The zones being served right now.
pub struct ZoneSet {
    catalog: Catalog,
    /// Origins in lower-case wire form, for routing.
    origins: Vec<Vec<u8>>,
}

impl ZoneSet {
    fn empty() -> Self {
        Self {
            catalog: Catalog::new(),
            origins: Vec::new(),
        }
    }

    /// True when a zone contains the wire name.
    pub fn contains(&self, qname: &[u8]) -> bool {
        self.origins.iter().any(|o| super::wire::name_in_zone(qname, o))
    }

    /// Number of zones.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// True when no zone is loaded.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// Answers `packet` from the zones: the full response bytes (the caller
    /// templates them), or the RCODE to answer with when hickory cannot take the
    /// request (FORMERR) or produced nothing (SERVFAIL).
    pub async fn lookup(&self, packet: &[u8], src: SocketAddr) -> Result<Vec<u8>, u8> {
        // TCP framing tells the catalog not to truncate: sizing is ours.
        let request =
            Request::from_bytes(packet.to_vec(), src, Protocol::Tcp).map_err(|_| super::wire::rcode::FORMERR)?;
        let capture = Capture::default();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.catalog.lookup(&request, None, now, capture.clone()).await;
        let response = capture.0.lock().take();
        response.ok_or(super::wire::rcode::SERVFAIL)
    }
}

/// A response sink that keeps the encoded bytes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(e.to_string()))?;
        *self.0.lock() = Some(bytes);
        Ok(info)
    }
}

/// A zone file that failed to load.
#[derive(Debug, Clone, thiserror::Error)]
#[error("zone file {path}: {problem}")]
pub struct ZoneError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong (printed here, so not a `source`).
    pub problem: ZoneFileError,
}

/// What is wrong with one zone file. Each cause is printed in the message,
/// once, so none is a `source`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ZoneFileError {
    /// The file's name, less `.zone`, is not a domain name.
    #[error("file name is not a zone origin: {0}")]
    Origin(String),
    /// The file could not be read.
    #[error("could not read: {0}")]
    Read(Arc<std::io::Error>),
    /// The master file does not parse (hickory's message names file and line).
    #[error("{0}")]
    Parse(Arc<hickory_proto::serialize::txt::ParseError>),
    /// The records do not make a zone (e.g. no SOA).
    #[error("{0}")]
    Zone(String),
}

struct Loaded {
    stamp: (SystemTime, u64),
    origin: Name,
    handler: Arc<InMemoryZoneHandler>,
}

/// Owns the zone directory: loads, reloads, and publishes [`ZoneSet`]s.
pub struct Zones {
    dir: PathBuf,
    current: ArcSwap<ZoneSet>,
    /// Per file: the last version that loaded.
    loaded: Mutex<BTreeMap<PathBuf, Loaded>>,
    /// The last scan's fingerprint, to skip unchanged directories cheaply.
    fingerprint: Mutex<Vec<(PathBuf, SystemTime, u64)>>,
}

impl Zones {
    /// An empty set for `dir`; call [`Zones::reload`] to load it.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(ZoneSet::empty()),
            loaded: Mutex::new(BTreeMap::new()),
            fingerprint: Mutex::new(Vec::new()),
        }
    }

    /// The zones served now.
    pub fn current(&self) -> arc_swap::Guard<Arc<ZoneSet>> {
        self.current.load()
    }

    fn scan(&self) -> Vec<(PathBuf, SystemTime, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                // Only `<origin>.zone` files are zones: editors' backups, READMEs
                // and `.sample` files next to them are left alone.
                let name = e.file_name();
                let name = name.to_string_lossy();
                !name.starts_with('.') && name.ends_with(".zone")
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                meta.is_file()
                    .then(|| (e.path(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()))
            })
            .collect();
        files.sort();
        files
    }

    /// Re-reads changed files (all of them when `force`); returns whether the
    /// served set changed, and the errors of files that did not load.
    pub fn reload(&self, force: bool) -> (bool, Vec<ZoneError>) {
        let files = self.scan();
        {
            let mut fp = self.fingerprint.lock();
            if !force && *fp == files {
                return (false, Vec::new());
            }
            *fp = files.clone();
        }
        let mut errors = Vec::new();
        let mut loaded = self.loaded.lock();
        let mut changed = false;
        // Files that disappeared take their zone with them.
        let before = loaded.len();
        loaded.retain(|path, _| files.iter().any(|(p, _, _)| p == path));
        changed |= loaded.len() != before;
        for (path, modified, len) in &files {
            let stamp = (*modified, *len);
            if !force && loaded.get(path).is_some_and(|l| l.stamp == stamp) {
                continue;
            }
            match load_zone(path) {
                Ok((origin, handler)) => {
                    tracing::info!(zone = %origin, file = %path.display(), "zone loaded");
                    loaded.insert(
                        path.clone(),
                        Loaded {
                            stamp,
                            origin,
                            handler: Arc::new(handler),
                        },
                    );
                    changed = true;
                }
                Err(problem) => {
                    let kept = loaded.contains_key(path);
                    tracing::error!(
                        file = %path.display(),
                        %problem,
                        "zone file rejected; {}",
                        if kept { "still serving its previous version" } else { "zone not served" }
                    );
                    errors.push(ZoneError {
                        path: path.clone(),
                        problem,
                    });
                }
            }
        }
        if changed || force {
            let mut set = ZoneSet::empty();
            for l in loaded.values() {
                let handler: Arc<dyn ZoneHandler> = l.handler.clone();
                set.catalog.upsert(LowerName::from(l.origin.clone()), vec![handler]);
                set.origins.push(super::wire::name_to_wire(&l.origin));
            }
            self.current.store(Arc::new(set));
        }
        (changed, errors)
    }
}

fn load_zone(path: &Path) -> Result<(Name, InMemoryZoneHandler), ZoneFileError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin_text = file_name.strip_suffix(".zone").unwrap_or(&file_name);
    let origin = crate::config::shared::parse_domain(origin_text).map_err(ZoneFileError::Origin)?;
    let text = std::fs::read_to_string(path).map_err(|e| ZoneFileError::Read(Arc::new(e)))?;
    let (origin, records) = Parser::new(text, Some(path.to_path_buf()), Some(origin))
        .parse()
        .map_err(|e| ZoneFileError::Parse(Arc::new(e)))?;
    let handler = InMemoryZoneHandler::new(origin.clone(), records, ZoneType::Primary, AxfrPolicy::Deny)
        .map_err(ZoneFileError::Zone)?;
    Ok((origin, handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_sample_zone_loads_and_only_zone_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("example.internal.zone"),
            include_str!("../../zones/example.internal.zone.sample"),
        )
        .unwrap();
        std::fs::write(dir.path().join("README.md"), "not a zone").unwrap();
        std::fs::write(dir.path().join("bad.zone.sample"), "not a zone").unwrap();
        let zones = Zones::new(dir.path());
        let (changed, errors) = zones.reload(false);
        assert!(changed);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(zones.current().len(), 1);
        assert!(zones.current().contains(b"\x02db\x07example\x08internal\x00"));
        let (changed, _) = zones.reload(false);
        assert!(!changed, "an unchanged directory is not reloaded");
    }

    #[test]
    fn a_zone_without_soa_is_rejected_with_its_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nosoa.test.zone"), "www 60 IN A 10.0.0.1\n").unwrap();
        let zones = Zones::new(dir.path());
        let (_, errors) = zones.reload(false);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("nosoa.test.zone"), "{}", errors[0]);
        assert!(zones.current().is_empty());
    }
}
