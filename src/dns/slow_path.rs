//! Where the questions a UDP worker cannot answer in its own loop go.

use tokio_util::task::TaskTracker;

/// Tasks on the dns's runtime, tracked so that `dns::run` waits for them at
/// shutdown (each is bounded by its forwarder's timeout and ends on its
/// shutdown).
#[derive(Clone)]
pub struct SlowPath {
    runtime: tokio::runtime::Handle,
    tasks: TaskTracker,
}

impl SlowPath {
    /// Tasks on `runtime`, tracked by `tasks`.
    pub fn new(runtime: tokio::runtime::Handle, tasks: TaskTracker) -> Self {
        Self { runtime, tasks }
    }

    /// Runs `task` on the runtime.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn_on(task, &self.runtime);
    }
}
