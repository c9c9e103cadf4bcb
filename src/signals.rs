//! Process signals. SIGTERM comes from systemd, docker stop and the supervisor;
//! SIGINT from Ctrl-C in a terminal; SIGHUP from an operator asking for a zone
//! reload (`kill -HUP`, `systemctl reload`).

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

/// Resolves on the first SIGTERM or SIGINT, with the signal's name.
pub async fn shutdown() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Notifies `reload` on every SIGHUP, for the life of the process.
pub fn forward_hangups(reload: Arc<Notify>) {
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler installs");
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading zones");
            reload.notify_one();
        }
    });
}
