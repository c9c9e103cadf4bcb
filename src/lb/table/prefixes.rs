//! The path-prefix maps of a table: host-independent prefixes and the
//! prefixes under one host name, matched by whole segments, longest first.
//!
//! ```text
//!  RoutingTable.paths  : PrefixMap ──longest(path)──▶ Backend
//!  RoutingTable.hosts  : host ──▶ HostRoutes (Root(backend) | Prefixes(PrefixMap))
//!  build / delta       ──claim / set──▶ PrefixMap
//! ```

use std::sync::Arc;

use super::backend::Backend;

/// Path prefixes to backends, matched by whole segments: `/minions` takes
/// `/minions` and `/minions/...` but not `/minionsX`; `/` takes everything.
/// Persistent (`imbl`): a table made from the previous one by a delta shares
/// every entry the delta did not touch.
#[derive(Debug, Clone, Default)]
pub(super) struct PrefixMap {
    /// Non-root prefixes (normalised: leading `/`, no trailing `/`).
    pub(super) by_prefix: imbl::HashMap<Arc<str>, Arc<Backend>>,
    /// The distinct lengths of the keys of `by_prefix`, longest first, each with
    /// how many keys have it: a lookup tries only the cuts of the path that could
    /// be a key, longest match first. As many as distinct lengths, so a clone
    /// per change costs little.
    pub(super) lens: Vec<(usize, u32)>,
    /// The `/` prefix.
    pub(super) root: Option<Arc<Backend>>,
}

impl PrefixMap {
    /// The backend at exactly `prefix`.
    pub(super) fn get(&self, prefix: &str) -> Option<&Arc<Backend>> {
        if prefix == "/" {
            self.root.as_ref()
        } else {
            self.by_prefix.get(prefix)
        }
    }

    /// Puts `backend` at `prefix`, or takes the prefix away (`None`).
    pub(super) fn set(&mut self, prefix: &Arc<str>, backend: Option<Arc<Backend>>) {
        if &**prefix == "/" {
            self.root = backend;
            return;
        }
        let len = prefix.len();
        let at = self.lens.binary_search_by(|(l, _)| len.cmp(l));
        match backend {
            Some(backend) => {
                if self.by_prefix.insert(prefix.clone(), backend).is_none() {
                    match at {
                        Ok(i) => self.lens[i].1 += 1,
                        Err(i) => self.lens.insert(i, (len, 1)),
                    }
                }
            }
            None => {
                if self.by_prefix.remove(&**prefix).is_some()
                    && let Ok(i) = at
                {
                    self.lens[i].1 -= 1;
                    if self.lens[i].1 == 0 {
                        self.lens.remove(i);
                    }
                }
            }
        }
    }

    /// Claims `prefix` for `backend`; returns the backend that keeps it when another
    /// one got there first.
    pub(super) fn claim(&mut self, prefix: &Arc<str>, backend: &Arc<Backend>) -> Result<(), Arc<Backend>> {
        match self.get(prefix) {
            Some(owner) if Arc::ptr_eq(owner, backend) => Ok(()),
            Some(owner) => Err(owner.clone()),
            None => {
                self.set(prefix, Some(backend.clone()));
                Ok(())
            }
        }
    }

    /// The backend of the longest prefix of `path`.
    pub(super) fn longest(&self, path: &str) -> Option<&Arc<Backend>> {
        for &(len, _) in &self.lens {
            // A cut is a candidate only at a segment boundary (which also makes it a
            // char boundary, so `get` cannot fail there).
            if !matches!(path.as_bytes().get(len), None | Some(b'/')) {
                continue;
            }
            if let Some(backend) = path.get(..len).and_then(|cut| self.by_prefix.get(cut)) {
                return Some(backend);
            }
        }
        self.root.as_ref()
    }

    /// Every (prefix, backend), `/` first.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Backend>)> {
        let root = self.root.iter().map(|b| ("/", b));
        root.chain(self.by_prefix.iter().map(|(p, b)| (&**p, b)))
    }
}

/// What one host name routes to. Nearly every host is a service's own name
/// with only the `/` prefix: that case is kept inline, without a map.
#[derive(Debug, Clone)]
pub(super) enum HostRoutes {
    /// Only `/`: every path.
    Root(Arc<Backend>),
    /// Path prefixes under the host (Fabio `urlprefix-host/path`).
    Prefixes(Arc<PrefixMap>),
}

impl HostRoutes {
    pub(super) fn longest(&self, path: &str) -> Option<&Arc<Backend>> {
        match self {
            HostRoutes::Root(backend) => Some(backend),
            HostRoutes::Prefixes(map) => map.longest(path),
        }
    }

    pub(super) fn to_map(&self) -> PrefixMap {
        match self {
            HostRoutes::Root(backend) => PrefixMap {
                root: Some(backend.clone()),
                ..PrefixMap::default()
            },
            HostRoutes::Prefixes(map) => (**map).clone(),
        }
    }

    /// The compact form of `map` (`None` when it routes nothing).
    pub(super) fn of(map: PrefixMap) -> Option<Self> {
        if map.by_prefix.is_empty() {
            map.root.map(HostRoutes::Root)
        } else {
            Some(HostRoutes::Prefixes(Arc::new(map)))
        }
    }
}
