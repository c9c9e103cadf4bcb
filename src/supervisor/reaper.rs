//! Grandchildren: `wayfinder up` makes itself a child subreaper, so processes its
//! programs leave behind (a shell's background job, a daemon's worker) are
//! re-parented to it instead of to init, and are reaped here rather than left
//! as zombies.
//!
//! ```text
//!  spawn (under the ChildSet lock) ──pid──▶ ChildSet  ◀── tokio waits for these
//!  SIGCHLD / every second ──▶ scan /proc for our zombie children not in ChildSet
//!                              └─ still a zombie ZOMBIE_GRACE after first seen?
//!                                  └─▶ waitpid(that pid) (never waitpid(-1), which
//!                                      would steal the status tokio waits for)
//! ```
//!
//! The grace is for the short-lived helpers the components run with
//! `std::process::Command` (the vpn's `nft`): their own thread is already in
//! `waitpid` for them and collects them at once; reaping them on the SIGCHLD
//! their exit raised would race it and make its `wait` fail with ECHILD. A
//! zombie nobody waits for stays one, and is reaped on a later pass.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// How long a zombie child nobody collected stays before it is reaped here.
pub const ZOMBIE_GRACE: Duration = Duration::from_secs(1);

/// The pids of the programs the supervisor spawned itself (tokio reaps those).
#[derive(Debug, Default)]
pub struct ChildSet {
    /// The set; a program is spawned and inserted while it is locked so the
    /// reaper can never see it exit before it is known.
    pub pids: Mutex<HashSet<u32>>,
}

impl ChildSet {
    /// Forgets `pid` after its exit was collected.
    pub fn remove(&self, pid: u32) {
        self.pids.lock().remove(&pid);
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
    let mut seen = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sigchld.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        reap_once(&children, &mut seen, Instant::now());
    }
}

async fn poll_only(children: std::sync::Arc<ChildSet>, shutdown: CancellationToken) {
    let mut seen = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        reap_once(&children, &mut seen, Instant::now());
    }
}

/// Of `zombies`, those first seen [`ZOMBIE_GRACE`] ago or more (forgotten in
/// `seen` as they are returned); the others are remembered from `now`.
fn due(zombies: Vec<u32>, seen: &mut HashMap<u32, Instant>, now: Instant) -> Vec<u32> {
    // A pid that is no zombie any more was collected by whoever waited for it.
    seen.retain(|pid, _| zombies.contains(pid));
    zombies
        .into_iter()
        .filter(|pid| {
            let first = *seen.entry(*pid).or_insert(now);
            let due = now.duration_since(first) >= ZOMBIE_GRACE;
            if due {
                seen.remove(pid);
            }
            due
        })
        .collect()
}

/// One pass: reap every zombie child that is not one of ours and has been a
/// zombie for [`ZOMBIE_GRACE`] (`seen`: when each was first seen as one).
fn reap_once(children: &ChildSet, seen: &mut HashMap<u32, Instant>, now: Instant) {
    let ours = children.pids.lock();
    let zombies: Vec<u32> = zombie_children()
        .into_iter()
        .filter(|pid| !ours.contains(pid))
        .collect();
    drop(ours);
    for pid in due(zombies, seen, now) {
        let mut status = 0;
        // SAFETY: waitpid on one specific pid that is our zombie child.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc > 0 {
            tracing::debug!(pid, status, "reaped an orphaned descendant");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_reaped_only_after_its_grace() {
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        assert!(
            due(vec![10, 11], &mut seen, t0).is_empty(),
            "first sight: someone may be collecting it"
        );
        // 11 was collected by its own waiter meanwhile; 10 was not.
        assert!(due(vec![10], &mut seen, t0 + ZOMBIE_GRACE / 2).is_empty());
        assert_eq!(due(vec![10], &mut seen, t0 + ZOMBIE_GRACE), vec![10]);
        assert!(seen.is_empty(), "reaped and collected ones are forgotten");
        // A pid seen again later starts its grace anew.
        assert!(due(vec![11], &mut seen, t0 + ZOMBIE_GRACE * 3).is_empty());
    }
}
