//! The connection runtimes: one single-threaded tokio runtime per core, each on a thread
//! of its own, and the accept loops deal connections out to them in turn. A connection's
//! socket readiness, its timers and its task stay on one thread, as in an event loop per
//! core: no task migrates and no wake-up crosses threads for the bytes of one connection.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

/// The connection runtimes' lifetime: each runs until the connections' tracker is closed
/// (by [`crate::proxy::Proxy::wait`], or when this is dropped) and empty, then ends with
/// its thread. A [`crate::proxy::Proxy`]
/// dropped without a shutdown therefore drains its connections as a shutdown would,
/// as they did when they ran on the caller's runtime. Owned by the proxy, not by what
/// the tasks share, and never joined: a thread waiting for the connections must not be
/// one they need.
#[derive(Debug)]
pub(crate) struct Workers {
    connections: TaskTracker,
}

/// Where connections are spawned: the runtimes' handles, taken in turn.
#[derive(Debug)]
pub(crate) struct Runtimes {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

/// One runtime per core the process may run on.
pub(crate) fn per_core() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Workers {
    /// Starts `count` runtimes (at least one) for the tasks of `connections`.
    pub(crate) fn start(
        count: usize,
        connections: &TaskTracker,
    ) -> io::Result<(Workers, Runtimes)> {
        // Dropped on an error below: the runtimes already started end.
        let workers = Workers {
            connections: connections.clone(),
        };
        let mut runtimes = Runtimes {
            handles: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for index in 0..count.max(1) {
            let (started, handle) = std::sync::mpsc::channel::<io::Result<Handle>>();
            let connections = connections.clone();
            // Built on its own thread: a runtime may not be dropped where the caller
            // runs, inside the control plane's runtime.
            std::thread::Builder::new()
                .name(format!("smartproxy-conn-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    runtime.block_on(connections.wait());
                })?;
            let handle = handle.recv().map_err(|_| {
                io::Error::other("a connection runtime's thread ended before its runtime started")
            })??;
            runtimes.handles.push(handle);
        }
        Ok((workers, runtimes))
    }
}

impl Runtimes {
    /// The runtime the next connection goes to: its sockets are registered with it
    /// (under [`Handle::enter`]) and its task spawned on it.
    pub(crate) fn next(&self) -> &Handle {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[index]
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // No connection is spawned on a dropped proxy's behalf but those on their way.
        self.connections.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropped when the task holding it is: says so on `dropped`.
    struct DropSignal(Option<std::sync::mpsc::Sender<()>>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            if let Some(dropped) = self.0.take() {
                let _ = dropped.send(());
            }
        }
    }

    #[test]
    fn connections_are_dealt_to_each_runtime_in_turn_and_outlive_the_workers() {
        let connections = TaskTracker::new();
        let (workers, runtimes) = Workers::start(2, &connections).expect("runtimes start");
        let (ran_on, threads) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let ran_on = ran_on.clone();
            runtimes.next().spawn(async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = ran_on.send(name);
            });
        }
        let mut names: Vec<_> = (0..4)
            .map(|_| {
                threads
                    .recv()
                    .expect("each task runs")
                    .expect("named thread")
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "smartproxy-conn-0",
                "smartproxy-conn-0",
                "smartproxy-conn-1",
                "smartproxy-conn-1"
            ]
        );

        // Once the workers are dropped, a connection still open keeps its runtime, and
        // another task on it, running until it ends; then the runtime stops, and a task
        // that never ends is dropped with it.
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let (finished, connection_finished) = std::sync::mpsc::channel();
        connections.spawn_on(
            async move {
                let _ = ended.await;
                let _ = finished.send(());
            },
            runtimes.next(),
        );
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let signal = DropSignal(Some(dropped));
        runtimes.next().spawn(async move {
            let _held = signal;
            std::future::pending::<()>().await;
        });
        drop(workers);
        let wait = std::time::Duration::from_millis(200);
        assert!(
            was_dropped.recv_timeout(wait).is_err(),
            "the runtimes stopped while a connection was open"
        );
        let _ = end.send(());
        connection_finished
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the open connection runs to its end after the workers are dropped");
        was_dropped
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the pending task is dropped once the last connection ended");
    }
}
