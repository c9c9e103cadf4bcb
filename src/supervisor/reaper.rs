//! Grandchildren: `wayfinder up` makes itself a child subreaper, so processes its
//! programs leave behind (a shell's background job, a daemon's worker) are
//! re-parented to it instead of to init, and are reaped here rather than left
//! as zombies.
//!
//! ```text
//!  spawn (under the ChildSet lock) ──pid──▶ ChildSet  ◀── tokio waits for these
//!  SIGCHLD / every second ──▶ scan /proc for our zombie children not in ChildSet
//!                              └─▶ waitpid(that pid) (never waitpid(-1), which
//!                                  would steal the status tokio waits for)
//! ```

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The pids of the programs the supervisor spawned itself (tokio reaps those).
#[derive(Debug, Default)]
pub struct ChildSet {
    pids: Mutex<HashSet<u32>>,
}

impl ChildSet {
    /// Holds the set locked; a program is spawned and inserted under this lock
    /// so the reaper can never see it exit before it is known.
    pub fn lock(&self) -> MutexGuard<'_, HashSet<u32>> {
        self.pids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets `pid` after its exit was collected.
    pub fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }
}

/// Makes this process the reaper of its orphaned descendants.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Our children that are zombies, from /proc (`<pid>/stat`: state and ppid).
fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // The command name may hold spaces and parentheses: fields start
            // after the last `)`.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid == Some(me)
        })
        .collect()
}

/// Reaps adopted orphans until `shutdown`. Only for a process whose children
/// are all spawned through `children` (the `up` binary), never in tests that
/// run other children in-process.
pub async fn run(children: std::sync::Arc<ChildSet>, shutdown: CancellationToken) {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGCHLD; orphans are reaped every second only");
            return poll_only(children, shutdown).await;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sigchld.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        reap_once(&children);
    }
}

async fn poll_only(children: std::sync::Arc<ChildSet>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        reap_once(&children);
    }
}

/// One pass: reap every zombie child that is not one of ours.
pub fn reap_once(children: &ChildSet) {
    let ours = children.lock();
    for pid in zombie_children() {
        if ours.contains(&pid) {
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid on one specific pid that is our zombie child.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc > 0 {
            tracing::debug!(pid, status, "reaped an orphaned descendant");
        }
    }
}
