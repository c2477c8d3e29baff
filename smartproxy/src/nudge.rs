//! A connection's nudge: the proxy tells one connection's task to look again at the state
//! every connection follows (the stop stage, an upgrade's handoff), which live in watch
//! channels. Each connection waiting on those watches itself took a lock shared by every
//! connection on each poll of its task, and registered and dropped a waiter on each turn
//! of its loop: 13 % of the proxy's user-space time in churn (docs/performance.md). A
//! nudge is a flag and the task's waker: two atomic operations per poll, on a cache line
//! of the connection's own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

#[derive(Debug, Default)]
pub struct Nudge {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Nudge {
    /// Makes the next [`Nudge::nudged`] (or the one pending) resolve. Whoever changes
    /// the state changes it first, then raises: a task that looks after the nudge sees
    /// the change.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once raised since it last resolved.
    pub async fn nudged(&self) {
        std::future::poll_fn(|cx| self.poll_nudged(cx)).await;
    }

    /// Forgets the waker the last poll left: a raise from now on wakes nobody until the
    /// next poll (it is not lost: that poll sees it).
    pub fn forget_waker(&self) {
        drop(self.waker.take());
    }

    /// Makes `cx`'s waker the one a raise wakes from now on, and says whether the nudge is
    /// raised now, leaving it raised for whoever takes it (a parking lot that only decides
    /// where the connection goes, `park`).
    pub fn watch(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        // After the registration: a raise before it is seen here, one after it wakes.
        self.raised.load(Ordering::Acquire)
    }

    /// [`Nudge::nudged`], polled with `cx`'s waker: the one a raise wakes from now on.
    pub fn poll_nudged(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.raised.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Raised between the first look and the registration: its wake found no waker.
        if self.raised.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_raise_wakes_the_waiting_task_and_is_taken_once() {
        let nudge = Nudge::default();
        let count = Arc::new(Count::default());
        let waker = Arc::clone(&count).into();
        let mut cx = Context::from_waker(&waker);
        let mut nudged = pin!(nudge.nudged());
        assert!(nudged.as_mut().poll(&mut cx).is_pending());
        nudge.raise();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the waiting task is woken"
        );
        assert!(nudged.as_mut().poll(&mut cx).is_ready());
        assert!(
            pin!(nudge.nudged()).poll(&mut cx).is_pending(),
            "a raise is taken once"
        );
    }

    #[test]
    fn a_watch_sees_a_raise_and_leaves_it() {
        let nudge = Nudge::default();
        let count = Arc::new(Count::default());
        let waker = Arc::clone(&count).into();
        let mut cx = Context::from_waker(&waker);
        assert!(!nudge.watch(&mut cx));
        nudge.raise();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the watcher is woken");
        assert!(nudge.watch(&mut cx), "raised");
        assert!(
            pin!(nudge.nudged()).poll(&mut cx).is_ready(),
            "and still there to be taken"
        );
    }

    #[test]
    fn a_raise_before_the_wait_is_kept() {
        let nudge = Nudge::default();
        nudge.raise();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(pin!(nudge.nudged()).poll(&mut cx).is_ready());
    }
}
