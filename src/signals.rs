//! Process signals. SIGTERM comes from systemd, docker stop and the supervisor;
//! SIGINT from Ctrl-C in a terminal; SIGHUP from an operator asking for a zone
//! reload (`kill -HUP`, `systemctl reload`).

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::component::Component;

/// Resolves on the first SIGTERM or SIGINT, with the signal's name.
pub async fn shutdown() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Asks every component to reload what it can on each SIGHUP, for the life
/// of the process (the dns re-reads its zones).
pub fn forward_hangups(components: Vec<Arc<dyn Component>>) {
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler installs");
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            for c in &components {
                if c.reload() {
                    tracing::info!(component = c.name(), "SIGHUP: reloading");
                }
            }
        }
    });
}
