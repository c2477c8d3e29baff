//! A parked connection that cannot be taken up again (its sockets cannot be registered
//! with a runtime, which takes a kernel out of memory) closes `proxy_error`, counted, and
//! gives back what it held: its admission slot and its descriptors.
//! A test binary of its own: the hook that makes take-ups fail
//! (`smartproxy::connection::test_hooks`) is process-wide.

use smartproxy::config::DataPathMode;
use smartproxy::connection::test_hooks;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_that_cannot_be_taken_up_closes_proxy_error() {
    init_tracing();
    let backend = Backend::spawn(echo).await;
    // One connection at a time: the next is admitted only if the failed one let go.
    let config = format!(
        "park_idle_after = \"200ms\"\n\n{}",
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
    // Its sockets are closed: EOF, or a reset for the bytes it did not read.
    let mut rest = Vec::new();
    let _eof_or_reset = within(
        "the client's connection ends",
        client.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty(), "{} bytes after the failure", rest.len());
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
