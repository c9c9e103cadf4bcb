//! Failure is never silent: panics and the OS threads components rely on.
//!
//! ```text
//!  lb proxy threads, dns UDP workers ──std::thread──▶ WatchedThreads (joined on
//!      tokio's blocking pool) ──next_end: first one to end, and how──▶ run's select!
//!  supervisor / component task ──JoinError (panic)──▶ join_error_message ──▶ AppError::Panicked (exit 70)
//! ```
//!
//! A component's `run` selects on [`WatchedThreads::next_end`] next to its
//! shutdown token: a thread that ends (returns or panics) while no shutdown was
//! asked for ends `run` with a typed error (`LbError::WorkerDied`,
//! `DnsError::WorkerDied`), so its supervisor restarts the whole component
//! rather than have it run on a worker short. All this needs panics to unwind
//! (the default; no profile may set `panic = "abort"`); the binary's panic hook
//! ([`crate::install_panic_hook`]) logs each one with its thread and location.

use std::any::Any;

use tokio::task::JoinSet;

/// The message of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What a task's `JoinError` says: `panicked: <message>`, or `cancelled`.
pub fn join_error_message(join: tokio::task::JoinError) -> String {
    if join.is_panic() {
        format!("panicked: {}", panic_message(&*join.into_panic()))
    } else {
        "cancelled".into()
    }
}

/// How a watched thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadEnd {
    /// The thread's name.
    pub name: String,
    /// `returned`, or `panicked: <message>`.
    pub how: String,
}

/// OS threads a component cannot work without, watched from async code.
#[derive(Default)]
pub struct WatchedThreads {
    set: JoinSet<ThreadEnd>,
}

impl WatchedThreads {
    /// Watches `threads` (from inside a tokio runtime).
    pub fn new(threads: impl IntoIterator<Item = std::thread::JoinHandle<()>>) -> Self {
        let mut watched = Self::default();
        for thread in threads {
            watched.watch(thread);
        }
        watched
    }

    /// Watches one more thread (from inside a tokio runtime).
    pub fn watch(&mut self, thread: std::thread::JoinHandle<()>) {
        let name = thread.thread().name().unwrap_or("unnamed").to_string();
        self.set.spawn_blocking(move || ThreadEnd {
            how: match thread.join() {
                Ok(()) => "returned".into(),
                Err(payload) => format!("panicked: {}", panic_message(&*payload)),
            },
            name,
        });
    }

    /// Threads not yet seen ending.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when every thread has been seen ending.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next thread to end; None when none is left. Cancel-safe (for `select!`).
    pub async fn next_end(&mut self) -> Option<ThreadEnd> {
        match self.set.join_next().await? {
            Ok(end) => Some(end),
            Err(join) => Some(ThreadEnd {
                name: "(unknown)".into(),
                how: format!("its watcher {}", join_error_message(join)),
            }),
        }
    }

    /// Waits until every thread has ended.
    pub async fn wait_all(&mut self) {
        while self.set.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new().name(name.into()).spawn(f).unwrap()
    }

    #[tokio::test]
    async fn the_first_thread_to_end_is_named_with_how() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let long = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
            move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let mut watched = WatchedThreads::new([
            thread("steady-0", long(stop.clone())),
            thread("steady-1", long(stop.clone())),
        ]);
        watched.watch(thread("doomed", || panic!("worker bug")));
        assert_eq!(watched.len(), 3);
        let end = tokio::time::timeout(Duration::from_secs(5), watched.next_end())
            .await
            .expect("the panicking thread is seen ending")
            .unwrap();
        assert_eq!(
            end,
            ThreadEnd {
                name: "doomed".into(),
                how: "panicked: worker bug".into()
            }
        );
        // The others run on until told to stop; then they end as `returned`.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), watched.next_end())
                .await
                .is_err()
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let end = watched.next_end().await.unwrap();
        assert_eq!(end.how, "returned");
        watched.wait_all().await;
        assert!(watched.is_empty());
        assert_eq!(watched.next_end().await, None);
    }

    #[tokio::test]
    async fn join_errors_and_payloads_read_as_messages() {
        let task = tokio::spawn(async { panic!("with {}", "format") });
        assert_eq!(join_error_message(task.await.unwrap_err()), "panicked: with format");
        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        assert_eq!(join_error_message(task.await.unwrap_err()), "cancelled");
        let payload: Box<dyn Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(&*payload), "(no message)");
    }
}
