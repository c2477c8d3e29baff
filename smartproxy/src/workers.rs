//! The connection runtimes: one single-threaded tokio runtime per core, each on a thread
//! of its own, and the accept loops deal connections out to them in turn. A connection's
//! socket readiness, its timers and its task stay on one thread, as in an event loop per
//! core: no task migrates and no wake-up crosses threads for the bytes of one connection.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The threads of the connection runtimes: dropping this stops them, and every task
/// still on them is dropped with its runtime. Owned by the [`crate::proxy::Proxy`], not
/// by what the tasks share: a task holding the last reference would otherwise join its
/// own thread.
#[derive(Debug)]
pub(crate) struct Workers {
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
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
    /// Starts `count` runtimes (at least one).
    pub(crate) fn start(count: usize) -> io::Result<(Workers, Runtimes)> {
        let mut workers = Workers {
            stops: Vec::new(),
            threads: Vec::new(),
        };
        let mut runtimes = Runtimes {
            handles: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            runtimes.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            workers.threads.push(
                std::thread::Builder::new()
                    .name(format!("smartproxy-conn-{index}"))
                    .spawn(move || {
                        // Either way the runtime stops: told to, or its `Workers` is gone.
                        let _ = runtime.block_on(stopped);
                    })?,
            );
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
        self.stops.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
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
    fn connections_are_dealt_to_each_runtime_in_turn_and_stop_with_the_workers() {
        let (workers, runtimes) = Workers::start(2).expect("runtimes start");
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

        // A task that never ends is dropped with its runtime when the workers stop.
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let signal = DropSignal(Some(dropped));
        runtimes.next().spawn(async move {
            let _held = signal;
            std::future::pending::<()>().await;
        });
        drop(workers);
        was_dropped
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the pending task is dropped once its runtime stops");
    }
}
