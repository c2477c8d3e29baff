//! Scenario fixtures: the setup that the tests of one connection's life repeat, so that
//! each test body says only what differs (the backend's script, the lifecycle table, what
//! the client does and what must follow).

use std::ops::{Deref, DerefMut};

use smartproxy::vocab::{Direction, Reason};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::tls::{Client, Frontend};
use crate::{Backend, TestProxy};

/// The one route of a scenario's proxy.
const ROUTE: &str = "scenario";

/// A proxy with one route to a [`Backend::greeted`] backend, and the kernel's byte counts
/// once the scenario's connection was established: what the kernel moves from then on is
/// the test's. Everything else is the proxy's ([`TestProxy`], by `Deref`).
pub struct Spliced {
    proxy: TestProxy,
    backend: Backend,
    spliced: [u64; 2],
}

impl Spliced {
    /// Starts a proxy on `front`'s data path whose config is `lifecycle` (a `[lifecycle]`
    /// table, or nothing for the defaults) and one route to `backend`, and returns it with a client connection established through it (spliced on
    /// the kernel path: [`TestProxy::established`]).
    pub async fn start(front: &Frontend, lifecycle: &str, backend: Backend) -> (Spliced, Client) {
        let config = format!("{lifecycle}\n{}", front.route(ROUTE, backend.addr, ""));
        let proxy = TestProxy::start(front.data_path(), &config).await;
        let client = proxy.established(front, ROUTE).await;
        let spliced = proxy.kernel_bytes();
        (
            Spliced {
                proxy,
                backend,
                spliced,
            },
            client,
        )
    }

    /// [`TestProxy::assert_kernel_moved`] since the scenario's connection was established.
    pub fn assert_kernel_moved(&self, direction: Direction) {
        self.proxy.assert_kernel_moved(self.spliced, direction);
    }

    /// Ends the scenario the way most do: its connection closes with `reason`, the kernel
    /// moved bytes in each of `moved` since the splice, then [`Spliced::finish`].
    pub async fn finish_closed(mut self, reason: Reason, moved: &[Direction]) {
        self.proxy.expect_closed(reason).await;
        for &direction in moved {
            self.assert_kernel_moved(direction);
        }
        self.finish().await;
    }

    /// The client sends its FIN and reads the backend's (an echo's) to EOF; the connection
    /// closes `normal`, the kernel having moved bytes both ways since the splice.
    pub async fn client_closes(self, client: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
        client.shutdown().await.expect("client FIN");
        crate::expect_eof(client, "the client reads to EOF").await;
        self.finish_closed(
            Reason::Normal,
            &[Direction::ClientToBackend, Direction::BackendToClient],
        )
        .await;
    }

    /// Waits for the backend's handlers (a panic there fails the test here), then stops
    /// the proxy.
    pub async fn finish(self) {
        self.backend.join().await;
        self.proxy.stop().await;
    }
}

impl Deref for Spliced {
    type Target = TestProxy;

    fn deref(&self) -> &TestProxy {
        &self.proxy
    }
}

impl DerefMut for Spliced {
    fn deref_mut(&mut self) -> &mut TestProxy {
        &mut self.proxy
    }
}
