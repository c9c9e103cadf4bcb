//! Active health checks of every backend instance, HAProxy style: each interval,
//! `haproxy_httpchk=` instances get that HTTP request (2xx/3xx = up), the others a
//! TCP connect. An instance goes down after [`FALL`] failures in a row and comes
//! back after [`RISE`] successes; the verdict is written to
//! [`InstanceState::check_up`](super::table::InstanceState), which
//! `Backend::pick` reads. An instance passively ejected after a refused
//! connection is back as soon as it passes [`RISE`] checks in a row after the
//! ejection. Consul's own checks still gate membership; these catch
//! what Consul's may not (a wedged HTTP server whose port still accepts).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::LbState;
use super::table::{CheckResult, InstanceState};
use super::tags::HttpCheck;

/// Successes in a row that bring a down instance back (HAProxy `rise`).
pub const RISE: u32 = 2;
/// Failures in a row that take an instance down (HAProxy `fall`).
pub const FALL: u32 = 3;
/// Checks in flight at once: a catalog of thousands of instances must not open
/// thousands of sockets in one burst (or run out of file descriptors). With many
/// unreachable instances a round then takes longer than the interval.
pub const MAX_CHECKS_IN_FLIGHT: usize = 64;

#[derive(Default)]
struct Streak {
    ok: u32,
    failed: u32,
}

/// Checks every instance of the current table each `interval` until shutdown.
pub async fn run(state: Arc<LbState>, interval: Duration, timeout: Duration, shutdown: CancellationToken) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let table = state.table.load_full();
        let mut targets: HashMap<SocketAddr, (Arc<InstanceState>, Option<HttpCheck>, String)> = HashMap::new();
        let tcp = table.tcp_ports().map(|(_, b)| b);
        for backend in table.backends().chain(tcp) {
            for i in &backend.instances {
                let entry = targets
                    .entry(i.addr)
                    .or_insert_with(|| (i.health.clone(), None, backend.service.clone()));
                if i.httpchk.is_some() {
                    entry.1 = i.httpchk.clone();
                }
            }
        }
        drop(table);
        streaks.retain(|addr, _| targets.contains_key(addr));
        let mut checks = JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CHECKS_IN_FLIGHT));
        for (addr, (health, httpchk, service)) in targets {
            let slots = slots.clone();
            checks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let http = httpchk.is_some();
                let result = tokio::time::timeout(timeout, check(addr, httpchk.as_ref()))
                    .await
                    .unwrap_or(Err(CheckError::Timeout(timeout)));
                (addr, health, service, http, result)
            });
        }
        while let Some(Ok((addr, health, service, http, result))) = checks.join_next().await {
            let now_ms = state.health.now_ms().max(1);
            health
                .last_check
                .store(CheckResult::of(&result, http).pack(), Ordering::Relaxed);
            health.last_check_ms.store(now_ms, Ordering::Relaxed);
            let streak = streaks.entry(addr).or_default();
            if result.is_ok() {
                streak.ok += 1;
                streak.failed = 0;
            } else {
                streak.failed += 1;
                streak.ok = 0;
            }
            let up = health.check_up.load(Ordering::Relaxed);
            // `failed >= FALL` means this check failed too, so `result` holds the reason.
            if let Err(reason) = &result
                && up
                && streak.failed >= FALL
            {
                health.check_up.store(false, Ordering::Relaxed);
                health.changed_ms.store(now_ms, Ordering::Relaxed);
                tracing::warn!(service, %addr, %reason, "lb: instance failed its health check; no new requests");
            } else if !up && streak.ok >= RISE {
                health.check_up.store(true, Ordering::Relaxed);
                health.changed_ms.store(now_ms, Ordering::Relaxed);
                tracing::info!(service, %addr, "lb: instance passes its health check again");
            }
            // A passive ejection (a refused connection) ends early once the
            // instance has passed RISE checks in a row since: it is back.
            if streak.ok >= RISE && health.ejected_until_ms.load(Ordering::Relaxed) > state.health.now_ms() {
                health.ejected_until_ms.store(0, Ordering::Relaxed);
                health.changed_ms.store(now_ms, Ordering::Relaxed);
                tracing::info!(service, %addr, "lb: ejected instance passes its health check; back in service");
            }
        }
    }
}

impl CheckResult {
    /// The result of one check; `http`: it was an HTTP check (`haproxy_httpchk`).
    fn of(result: &Result<(), CheckError>, http: bool) -> Self {
        match result {
            Ok(()) if http => CheckResult::L7Ok,
            Ok(()) => CheckResult::L4Ok,
            Err(CheckError::Connect(_)) => CheckResult::L4Con,
            Err(CheckError::Timeout(_)) if http => CheckResult::L7Tout,
            Err(CheckError::Timeout(_)) => CheckResult::L4Tout,
            Err(CheckError::Status(s)) => CheckResult::L7Sts(*s),
            Err(CheckError::Send(_) | CheckError::Read(_) | CheckError::Closed | CheckError::NotHttp) => {
                CheckResult::L7Rsp
            }
        }
    }
}

/// Why an instance failed one active check (the `reason` of the log line).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No TCP connection.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The check request could not be written.
    #[error("send: {0}")]
    Send(std::io::Error),
    /// The answer could not be read.
    #[error("read: {0}")]
    Read(std::io::Error),
    /// The connection ended before a whole status line.
    #[error("closed before a status line")]
    Closed,
    /// An answer outside 2xx/3xx.
    #[error("status {0}")]
    Status(u16),
    /// Something that is not an HTTP status line.
    #[error("not an HTTP response")]
    NotHttp,
    /// No answer within the check timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn check(addr: SocketAddr, httpchk: Option<&HttpCheck>) -> Result<(), CheckError> {
    let mut stream = TcpStream::connect(addr).await.map_err(CheckError::Connect)?;
    let Some(chk) = httpchk else {
        return Ok(());
    };
    let mut request = format!("{} {} {}\r\n", chk.method, chk.path, chk.version);
    if !chk.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in &chk.headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Connection: close\r\nUser-Agent: wayfinder-check\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(CheckError::Send)?;
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        let n = stream.read(&mut head[got..]).await.map_err(CheckError::Read)?;
        if n == 0 {
            return Err(CheckError::Closed);
        }
        got += n;
    }
    // "HTTP/1.x NNN ..."
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..400).contains(&s) => Ok(()),
        Some(s) => Err(CheckError::Status(s)),
        None => Err(CheckError::NotHttp),
    }
}
