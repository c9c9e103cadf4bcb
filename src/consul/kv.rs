//! A KV tree followed live: one blocking query on `/v1/kv/<prefix>?recurse`
//! (one lane), its keys and values published as one immutable map.
//!
//! ```text
//!  follow(kv/<prefix>?recurse) ──▶ Event<KvTree> ──▶ watch channel ──▶ readers
//! ```
//!
//! Values are base64 in Consul's answer; a value that is not UTF-8 text (or is
//! empty) is `None`. A prefix without keys answers 404, which is an empty tree.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ConsulError;
use super::http::{Answer, ConsulHttp, Endpoint, segment};
use super::watch::{Query, WatchStats, follow};

/// Keys under the prefix with their text values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvTree {
    /// Full key to value (`None`: empty or not text).
    pub entries: BTreeMap<String, Option<String>>,
    /// False until Consul first answered.
    pub loaded: bool,
}

/// A reader's handle on a followed KV tree.
#[derive(Clone, Debug)]
pub struct KvView {
    rx: watch::Receiver<Arc<KvTree>>,
    stats: Arc<WatchStats>,
}

impl KvView {
    /// The tree as it is now.
    pub fn current(&self) -> Arc<KvTree> {
        self.rx.borrow().clone()
    }

    /// A receiver told of every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<KvTree>> {
        self.rx.clone()
    }

    /// The watch's counters.
    pub fn stats(&self) -> &Arc<WatchStats> {
        &self.stats
    }

    /// False once its task has ended.
    pub fn is_alive(&self) -> bool {
        self.rx.has_changed().is_ok()
    }
}

#[derive(Deserialize)]
struct KvEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
}

fn decode(http: &ConsulHttp, endpoint: Endpoint, answer: &Answer) -> Result<KvTree, ConsulError> {
    if answer.status == ::http::StatusCode::NOT_FOUND {
        return Ok(KvTree {
            entries: BTreeMap::new(),
            loaded: true,
        });
    }
    let entries: Vec<KvEntry> = http.decode(endpoint, answer)?;
    use base64::Engine as _;
    let text = |v: Option<String>| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v?).ok()?;
        String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
    };
    Ok(KvTree {
        entries: entries.into_iter().map(|e| (e.key, text(e.value))).collect(),
        loaded: true,
    })
}

/// Starts following `prefix` on `tasks` until `shutdown`.
pub(super) fn start(
    http: ConsulHttp,
    prefix: &str,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<KvView, ConsulError> {
    let lane = http.lane().ok_or(ConsulError::NoLane)?;
    let stats = WatchStats::new(format!("kv {prefix}"));
    let path = format!(
        "/v1/kv/{}?recurse&stale",
        prefix.split('/').map(segment).collect::<Vec<_>>().join("/")
    );
    let (events_tx, mut events) = mpsc::channel(4);
    let stop = shutdown.child_token();
    let query = Query {
        endpoint: Endpoint::KvTree,
        path,
        decode,
    };
    tasks.spawn(follow(lane, query, stats.clone(), events_tx, |e| e, stop.clone()));
    let (tx, rx) = watch::channel(Arc::new(KvTree::default()));
    tasks.spawn(async move {
        let _stop_watch = stop.drop_guard();
        while let Some(event) = events.recv().await {
            if **tx.borrow() != event.value {
                tx.send_replace(Arc::new(event.value));
            }
        }
    });
    Ok(KvView { rx, stats })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: ::http::StatusCode::from_u16(status).unwrap(),
            index: 1,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn values_are_text_or_none_and_404_is_empty() {
        let http = ConsulHttp::new("127.0.0.1:1".parse().unwrap());
        let tree = decode(
            &http,
            Endpoint::KvTree,
            &answer(
                200,
                r#"[{"Key":"haproxy/web/maxconn","Value":"MjA="},{"Key":"haproxy/x","Value":null},{"Key":"haproxy/bin","Value":"/w=="}]"#,
            ),
        )
        .unwrap();
        assert_eq!(tree.entries["haproxy/web/maxconn"].as_deref(), Some("20"));
        assert_eq!(tree.entries["haproxy/x"], None);
        assert_eq!(tree.entries["haproxy/bin"], None);
        assert!(
            decode(&http, Endpoint::KvTree, &answer(404, ""))
                .unwrap()
                .entries
                .is_empty()
        );
        assert!(decode(&http, Endpoint::KvTree, &answer(500, "boom")).is_err());
    }
}
