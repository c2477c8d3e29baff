//! The connection runtimes: one single-threaded tokio runtime per core, each on a thread
//! of its own. Each runtime accepts on every listener and keeps what it accepted, unless
//! it holds more tasks than another by more than [`IMBALANCE`]: then the connection
//! goes to the runtime with the fewest. A connection's socket readiness, its timers and
//! its task stay on one thread, as in an event loop per core: no task migrates and no
//! wake-up crosses threads for the bytes of one connection, most often not even for its
//! accept.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

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

/// How many more tasks (connections, and the same accept loops on each) than the least
/// loaded runtime the accepting one may hold and still keep a new connection: a burst of
/// connects that wakes one runtime first is shared out, and in churn most connections stay
/// where they were accepted.
const IMBALANCE: usize = 1;

/// How often a runtime's anchor timer ([`anchor_timers`]) fires: shorter than the
/// connection timers it keeps from waking the driver (a backend connect's, 5 s by default,
/// is the shortest), long enough that an idle runtime all but sleeps.
const ANCHOR_PERIOD: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`ANCHOR_PERIOD`] on this runtime, always. tokio wakes its own
/// I/O driver (an eventfd write, then an extra `epoll_wait`) whenever a timer is set that
/// is due before every timer the driver last parked with, even from the driver's own
/// thread while it runs tasks (tokio-rs/tokio#5207). Without an anchor, a connection's
/// connect timeout and its lifecycle deadlines were such a timer about once per
/// connection; with it, they are later than the anchor, and the driver is woken for it
/// once per period.
async fn anchor_timers() -> Infallible {
    loop {
        tokio::time::sleep(ANCHOR_PERIOD).await;
    }
}

/// Where connections are spawned: the runtimes' handles.
#[derive(Debug)]
pub(crate) struct Runtimes {
    handles: Vec<Handle>,
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
        let count = count.max(1);
        let mut runtimes = Runtimes {
            handles: Vec::new(),
        };
        for index in 0..count {
            let (started, handle) = std::sync::mpsc::channel::<io::Result<Handle>>();
            let connections = connections.clone();
            // Built on its own thread: a runtime may not be dropped where the caller
            // runs, inside the control plane's runtime.
            std::thread::Builder::new()
                .name(format!("smartproxy-conn-{index}"))
                .spawn(move || {
                    // Sockets and timers only: a runtime with the signal and process
                    // drivers looks for orphaned child processes, under a lock every such
                    // runtime shares, each time it parks.
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        tokio::select! {
                            () = connections.wait() => {}
                            never = anchor_timers() => match never {},
                        }
                    });
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
    /// The runtime a new connection goes to: `accepted_on` (the index of the runtime that
    /// accepted it, if one did) unless that one holds more than [`IMBALANCE`] tasks more
    /// than the least loaded, which it goes to then. Its sockets are registered with it
    /// (under [`Handle::enter`]) and its task spawned on it. Load is tokio's count of each
    /// runtime's live tasks: a connection's task, and the same accept loops on each.
    pub(crate) fn place(&self, accepted_on: Option<usize>) -> &Handle {
        let load = |index: usize| self.handles[index].metrics().num_alive_tasks();
        let least = (0..self.handles.len())
            .min_by_key(|&index| load(index))
            .unwrap_or(0);
        let index = match accepted_on {
            Some(here) if load(here) <= load(least) + IMBALANCE => here,
            _ => least,
        };
        &self.handles[index]
    }

    /// Every runtime, by index: each one accepts on every listener.
    pub(crate) fn all(&self) -> &[Handle] {
        &self.handles
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

    /// Which of `runtimes` `handle` is.
    fn index_of(runtimes: &Runtimes, handle: &Handle) -> usize {
        runtimes
            .all()
            .iter()
            .position(|runtime| std::ptr::eq(runtime, handle))
            .expect("one of the runtimes")
    }

    #[test]
    fn a_runtime_keeps_what_it_accepted_until_it_holds_more_than_one_over_the_least() {
        let connections = TaskTracker::new();
        let (_workers, runtimes) = Workers::start(2, &connections).expect("runtimes start");
        // Connections that stay open until told to end.
        let mut ends = Vec::new();
        let mut placed_on = Vec::new();
        for _ in 0..5 {
            let handle = runtimes.place(Some(0));
            placed_on.push(index_of(&runtimes, handle));
            let (end, ended) = tokio::sync::oneshot::channel::<()>();
            connections.spawn_on(
                async move {
                    let _ = ended.await;
                },
                handle,
            );
            ends.push(end);
        }
        // Counts after each: (1, 0), (2, 0), (2, 1), (3, 1), (3, 2).
        assert_eq!(placed_on, [0, 0, 1, 0, 1]);
        // Connections that ended no longer count: with runtime 1's two gone, it is the
        // least loaded, and a resumed connection (accepted by none) goes there.
        for end in [ends.remove(4), ends.remove(2)] {
            let _ = end.send(());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while runtimes.all()[1].metrics().num_alive_tasks() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "runtime 1's connections end"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(index_of(&runtimes, runtimes.place(None)), 1);
    }

    /// Write system calls this thread made so far (`syscw` of `/proc/thread-self/io`).
    fn writes_of_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("per-thread I/O counts");
        io.lines()
            .find_map(|line| line.strip_prefix("syscw: "))
            .and_then(|count| count.trim().parse().ok())
            .expect("a syscw line")
    }

    /// A timer set on a runtime's own thread, later than its anchor, does not make the
    /// runtime wake its driver (an eventfd write): what every connection's connect timeout
    /// did before the anchor.
    #[test]
    fn a_timer_later_than_the_anchor_does_not_wake_the_runtime() {
        let connections = TaskTracker::new();
        let (_workers, runtimes) = Workers::start(1, &connections).expect("runtimes start");
        let (writes, counted) = std::sync::mpsc::channel();
        runtimes.all()[0].spawn(async move {
            // The driver has parked since the anchor was set.
            tokio::time::sleep(Duration::from_millis(10)).await;
            let before = writes_of_this_thread();
            for _ in 0..100 {
                let mut timer = std::pin::pin!(tokio::time::sleep(ANCHOR_PERIOD * 5));
                // Registered on its first poll.
                std::future::poll_fn(|cx| {
                    let _ = std::future::Future::poll(timer.as_mut(), cx);
                    std::task::Poll::Ready(())
                })
                .await;
            }
            let _ = writes.send(writes_of_this_thread() - before);
        });
        let writes = counted.recv().expect("the runtime counts");
        assert!(writes < 5, "{writes} writes for 100 timers");
    }

    #[test]
    fn connections_outlive_the_workers() {
        let connections = TaskTracker::new();
        let (workers, runtimes) = Workers::start(2, &connections).expect("runtimes start");
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
            runtimes.place(None),
        );
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let signal = DropSignal(Some(dropped));
        runtimes.place(None).spawn(async move {
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
