//! One supervised child process: spawned in its own process group, its output
//! forwarded line by line to the log under its name, restarted by its policy
//! with backoff, stopped with its stop signal and then SIGKILL.
//!
//! ```text
//!  supervise ─spawn─▶ child (pgid = pid, PDEATHSIG=KILL)
//!      │               ├─ stdout ─▶ lines ─▶ tracing "name: line"
//!      │               └─ stderr ─▶ lines ─▶ tracing "name: line"
//!      ├─ exit ──▶ policy (always | on-failure | never) ──▶ Backoff ──▶ spawn again
//!      ├─ admin restart ──▶ stop ──▶ spawn at once
//!      └─ shutdown ──▶ stop: signal the group, wait stop_timeout, SIGKILL the group
//!                      (logged "stopped" whatever the exit status: it was asked to)
//! ```
//!
//! The whole group is signalled, so a shell's children go with it; whatever is
//! left in the group after the leader exits is killed too. A process that left
//! the group (setsid) keeps the pipes only until the next start: the output
//! tasks of a run are aborted then, and when the supervisor ends.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::reaper::ChildSet;
use super::settings::{ProgramConfig, RestartPolicy, RestartSettings};
use super::unit::{Backoff, UnitHandle, UnitState, Verdict};

/// Longest output line forwarded in one piece (longer ones are split).
const MAX_LINE: u64 = 8 * 1024;

/// What a program supervisor needs besides its config.
#[derive(Clone)]
pub struct ProgramContext {
    /// Restart arithmetic settings.
    pub restart: RestartSettings,
    /// Pids the supervisor spawned (for the orphan reaper).
    pub children: Arc<ChildSet>,
    /// Fires `true` once the built-in Consul has a leader, when `up` runs one.
    pub consul_ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// Upper bound of the wait for it.
    pub consul_wait: Duration,
}

/// `exit status 1`, `signal 9 (SIGKILL)`.
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".into(),
    }
}

fn spawn(config: &ProgramConfig, children: &ChildSet) -> std::io::Result<Child> {
    let mut cmd = Command::new(&config.command);
    cmd.args(&config.args)
        .envs(&config.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &config.dir {
        cmd.current_dir(dir);
    }
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec. PDEATHSIG makes
    // the kernel kill the child when the thread that spawned it goes (a SIGKILLed
    // `wayfinder up` must not leave consul behind); the getppid check closes the
    // window in which the parent died before the flag was set. The spawning
    // thread is a runtime worker, which lives as long as the runtime (nothing in
    // Wayfinder uses `block_in_place`, which could retire one early).
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut pids = children.pids.lock();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        pids.insert(pid);
    }
    Ok(child)
}

/// Forwards one pipe to the log, a line at a time.
async fn forward<R: AsyncRead + Unpin>(name: String, stream: &'static str, pipe: R) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                tracing::info!(target: "wayfinder::program", stream, "{name}: {text}");
            }
        }
    }
}

fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) on a process group we created (pgid = the leader's pid).
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

/// Stops a running child: its stop signal to the group, SIGKILL after
/// `stop_timeout`, then reaps it and kills whatever is left in its group.
async fn stop(child: &mut Child, config: &ProgramConfig) -> Option<ExitStatus> {
    let pid = child.id()?;
    signal_group(pid, config.stop_signal);
    let status = match tokio::time::timeout(config.stop_timeout, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(program = %config.name, timeout = ?config.stop_timeout, "did not stop in time; SIGKILL");
            signal_group(pid, libc::SIGKILL);
            child.wait().await.ok()
        }
    };
    signal_group(pid, libc::SIGKILL);
    status
}

/// Runs one program under supervision until `shutdown`. With `autostart` false
/// it waits for an admin restart first.
///
/// Long on purpose: one loop is the program's life (start, wait for its end
/// or a request, back off), and each state's `select!` needs the same locals;
/// split, they would be passed around as a struct only this loop uses.
pub async fn supervise(
    config: ProgramConfig,
    handle: Arc<UnitHandle>,
    ctx: ProgramContext,
    autostart: bool,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(ctx.restart);
    let mut first = true;
    if !autostart {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = handle.restart.notified() => {}
        }
    }
    if let (true, Some(mut ready)) = (config.needs_consul, ctx.consul_ready.clone()) {
        handle.set_state(UnitState::Waiting);
        tokio::select! {
            _ = shutdown.cancelled() => {
                handle.set_state(UnitState::Stopped);
                return;
            }
            waited = tokio::time::timeout(ctx.consul_wait, ready.wait_for(|r| *r)) => if waited.is_err() {
                tracing::warn!(program = %config.name, wait = ?ctx.consul_wait, "consul has no leader yet; starting anyway");
            },
        }
    }
    // The tasks forwarding the child's stdout and stderr: they end at the
    // pipes' end, and are aborted at the next start and with this function.
    let mut output;
    loop {
        handle.set_state(UnitState::Starting);
        let started = Instant::now();
        let outcome = match spawn(&config, &ctx.children) {
            Err(error) => {
                tracing::error!(program = %config.name, command = %config.command.display(), %error, "could not start program");
                handle.ended(format!("could not start {}: {error}", config.command.display()));
                Outcome::Failed
            }
            Ok(mut child) => {
                let pid = child.id();
                handle.running(pid, first);
                first = false;
                tracing::info!(program = %config.name, pid, "program started");
                // A process that left the group (setsid) may still hold the
                // last run's pipes: its lines are forwarded until this start,
                // when the old set (and with it every task still in it) goes.
                output = tokio::task::JoinSet::new();
                if let Some(out) = child.stdout.take() {
                    output.spawn(forward(config.name.clone(), "stdout", out));
                }
                if let Some(err) = child.stderr.take() {
                    output.spawn(forward(config.name.clone(), "stderr", err));
                }
                let outcome = tokio::select! {
                    status = child.wait() => {
                        let status = status.ok();
                        if let Some(pid) = pid {
                            signal_group(pid, libc::SIGKILL);
                        }
                        let how = status.as_ref().map_or_else(|| "ended".into(), describe);
                        tracing::warn!(program = %config.name, pid, status = %how, "program exited");
                        handle.ended(how);
                        match (config.restart, status.is_some_and(|s| s.success())) {
                            (RestartPolicy::Never, _) | (RestartPolicy::OnFailure, true) => Outcome::Done,
                            _ => Outcome::Failed,
                        }
                    }
                    _ = handle.restart.notified() => {
                        handle.set_state(UnitState::Stopping);
                        let status = stop(&mut child, &config).await;
                        // Asked to stop: how it ended (consul exits 1 on SIGTERM) is no failure.
                        tracing::debug!(program = %config.name, status = %status.as_ref().map_or_else(|| "ended".into(), describe), "program stopped for a restart");
                        handle.ended("restarted by request".into());
                        Outcome::Restart
                    }
                    _ = shutdown.cancelled() => {
                        handle.set_state(UnitState::Stopping);
                        let status = stop(&mut child, &config).await;
                        // Asked to stop: stopped, whatever its exit status (consul
                        // exits 1 on SIGTERM); the status is there for debugging.
                        tracing::debug!(program = %config.name, status = %status.as_ref().map_or_else(|| "ended".into(), describe), "program's exit after the stop request");
                        tracing::info!(program = %config.name, "program stopped");
                        handle.ended("stopped".into());
                        Outcome::Shutdown
                    }
                };
                if let Some(pid) = pid {
                    ctx.children.remove(pid);
                }
                outcome
            }
        };
        let wait_for_request = match outcome {
            Outcome::Shutdown => {
                handle.set_state(UnitState::Stopped);
                return;
            }
            Outcome::Restart => {
                backoff.reset();
                continue;
            }
            Outcome::Done => {
                handle.set_state(UnitState::Exited);
                true
            }
            Outcome::Failed => match backoff.failed(Instant::now(), started.elapsed()) {
                Verdict::GiveUp => {
                    tracing::error!(program = %config.name, "failed too often; marked failed (restart it from the admin API)");
                    handle.set_state(UnitState::Failed);
                    true
                }
                Verdict::Retry(delay) => {
                    tracing::info!(program = %config.name, ?delay, "restarting after backoff");
                    if !handle.wait_out_backoff(delay, &mut backoff, &shutdown).await {
                        return;
                    }
                    false
                }
            },
        };
        if wait_for_request {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = handle.restart.notified() => backoff.reset(),
            }
        }
    }
}

/// How one run of a program ended, from the supervisor's point of view.
enum Outcome {
    /// Ended and needs a restart by the policy.
    Failed,
    /// Ended and the policy says leave it.
    Done,
    /// Stopped for an admin restart.
    Restart,
    /// Stopped for shutdown.
    Shutdown,
}

/// Stop time in the worst case (for the overall shutdown grace).
pub fn worst_stop_time(config: &ProgramConfig) -> Duration {
    config.stop_timeout + Duration::from_secs(1)
}
