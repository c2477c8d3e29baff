//! Bounded waits: reaching a bound is a failure, never the wait itself.

use std::future::Future;
use std::time::{Duration, Instant};

/// Bounds every wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);
/// How often a polling wait looks again.
pub const POLL: Duration = Duration::from_millis(10);

/// Awaits `future`, bounded by [`WAIT`]; a timeout panics naming `what`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// Polls `condition` every [`POLL`] until it holds, bounded by [`WAIT`]. Only for state
/// that no event announces (counters, descriptor counts).
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
}

/// [`wait_for`] for a test without a runtime: blocks the thread between looks.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?}: {what}"
        );
        std::thread::sleep(POLL);
    }
}
