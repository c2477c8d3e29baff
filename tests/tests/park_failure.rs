//! A parked connection that cannot be taken up again (its sockets cannot be registered
//! with a runtime, which takes a kernel out of memory) closes `proxy_error`, counted,
//! resets both sides (a FIN would tell the backend that the cut stream ended), and gives
//! back what it held: its admission slot and its descriptors.
//! A test binary of its own: the hook that makes take-ups fail
//! (`smartproxy::connection::test_hooks`) is process-wide.

use smartproxy::config::DataPathMode;
use smartproxy::connection::test_hooks;
use smartproxy::vocab::Reason;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_that_cannot_be_taken_up_closes_proxy_error() {
    init_tracing();
    // The first connection's backend echoes once and must then see a reset; the next
    // ones echo.
    let reset_seen = Arc::new(Notify::new());
    let backend = Backend::spawn_with(
        (Arc::new(AtomicUsize::new(0)), Arc::clone(&reset_seen)),
        |mut stream, (accepted, reset_seen)| async move {
            if accepted.fetch_add(1, Ordering::SeqCst) > 0 {
                return echo(stream).await;
            }
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.expect("backend reads");
            stream.write_all(&ping).await.expect("backend echoes");
            expect_reset(&mut stream).await;
            reset_seen.notify_one();
        },
    )
    .await;
    // One connection at a time: the next is admitted only if the failed one let go.
    let config = format!(
        "{PARK_SOON}{}",
        plain_route("parked", backend.addr, "max_connections = 1")
    );
    let mut proxy = TestProxy::start(DataPathMode::Userspace, &config).await;
    let fds = open_fds();
    let mut client = connect(proxy.addr("parked")).await;
    round_trip(&mut client, b"ping").await;
    proxy.wait_parked(1).await;

    test_hooks::fail_take_ups();
    client.write_all(b"wake").await.expect("client writes");
    proxy.expect_closed(Reason::ProxyError).await;
    expect_reset(&mut client).await;
    within("the backend sees a reset", reset_seen.notified()).await;
    assert_eq!(proxy.stats().closed(Reason::ProxyError), 1);
    // The proxy's two descriptors, the client's and the backend's are all closed.
    drop(client);
    wait_for("every descriptor of the failed connection to close", || {
        open_fds() == fds
    })
    .await;

    // The slot it held is free: the next connection is admitted and relayed (it must
    // not park, or its take-up would fail too).
    proxy.rewrite_config(&config.replace("200ms", "0s"));
    proxy.proxy.reload().await.expect("the reload");
    let mut next = connect(proxy.addr("parked")).await;
    round_trip(&mut next, b"next").await;
    next.shutdown().await.expect("client FIN");
    expect_eof(&mut next, "the next connection closes").await;
    proxy.expect_closed(Reason::Normal).await;
    backend.join().await;
    proxy.stop().await;
}
