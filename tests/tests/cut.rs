//! A cut stream must look cut: when a grace period ends (after a shutdown, or a graceful
//! close that did not finish in time), a connection whose two directions both finished
//! ends with a FIN, and any other is reset on both sides, idle or not. Each kernel variant
//! is spliced first.

use std::time::Duration;

use smartproxy::config::DataPathMode;
use smartproxy::vocab::DataPathKind;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GREETING: &[u8] = b"hello";

/// Echoes the greeting, then `rest` decides what the backend does.
async fn greet_back(stream: &mut TcpStream) {
    let mut greeting = [0u8; GREETING.len()];
    stream
        .read_exact(&mut greeting)
        .await
        .expect("backend reads the greeting");
    stream
        .write_all(&greeting)
        .await
        .expect("backend echoes it");
}

/// A round trip through the proxy, then asserts which path the connection is on.
async fn established(proxy: &TestProxy, mode: DataPathMode, route: &str) -> TcpStream {
    let mut client = connect(proxy.addr(route)).await;
    client.write_all(GREETING).await.expect("client greets");
    let mut echoed = [0u8; GREETING.len()];
    within("the greeting comes back", client.read_exact(&mut echoed))
        .await
        .expect("client reads the echo");
    let expected = match mode {
        DataPathMode::Ebpf => DataPathKind::Ebpf,
        _ => DataPathKind::Userspace,
    };
    let rows = proxy.proxy.connection_rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].data_path, Some(expected), "{rows:?}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resets_both_sides_of_a_stream_still_open_at_the_end_of_grace() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(|mut stream| async move {
            greet_back(&mut stream).await;
            expect_reset(&mut stream).await;
        })
        .await;
        let route = plain_route("cut", backend.addr, "");
        let mut proxy = TestProxy::start(
            mode,
            &format!("[lifecycle]\ngrace_period = \"300ms\"\n\n{route}"),
        )
        .await;
        let mut client = established(&proxy, mode, "cut").await;
        proxy.proxy.shutdown();
        // Idle at the end of grace, as far as the proxy can tell: still cut.
        expect_reset(&mut client).await;
        proxy.expect_closed(Reason::Shutdown).await;
        backend.join().await;
        within("the proxy stops", proxy.proxy.wait()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resets_a_half_closed_stream_at_the_end_of_grace() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(|mut stream| async move {
            greet_back(&mut stream).await;
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .await
                .expect("the client's FIN");
            // Never ends backend->client: the proxy must cut it.
            expect_reset_after_eof(&stream).await;
        })
        .await;
        let route = plain_route("cut", backend.addr, "");
        let mut proxy = TestProxy::start(
            mode,
            &format!("[lifecycle]\ngrace_period = \"300ms\"\n\n{route}"),
        )
        .await;
        let client = established(&proxy, mode, "cut").await;
        let (mut read, mut write) = client.into_split();
        write.shutdown().await.expect("client FIN");
        proxy.proxy.shutdown();
        expect_reset(&mut read).await;
        proxy.expect_closed(Reason::Shutdown).await;
        backend.join().await;
        within("the proxy stops", proxy.proxy.wait()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_close_whose_directions_both_finished_ends_with_fin() {
    for_each_data_path(|mode| async move {
        // The backend reads the proxy's FIN and then keeps its own side open past grace.
        let backend = Backend::spawn(|mut stream| async move {
            greet_back(&mut stream).await;
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .await
                .expect("a FIN, not a reset");
            tokio::time::sleep(Duration::from_millis(600)).await;
        })
        .await;
        let route = plain_route("cut", backend.addr, "");
        let mut proxy = TestProxy::start(
            mode,
            &format!(
                "[lifecycle]\ninactivity_timeout = \"300ms\"\ntimeout_behavior = \"close\"\n\
                 grace_period = \"200ms\"\n\n{route}"
            ),
        )
        .await;
        let mut client = established(&proxy, mode, "cut").await;
        // The client never answers the proxy's FIN either.
        let mut rest = Vec::new();
        within("the proxy's FIN", client.read_to_end(&mut rest))
            .await
            .expect("a FIN, then no reset");
        proxy.expect_closed(Reason::InactivityTimeout).await;
        let mut byte = [0u8; 1];
        assert_eq!(
            client
                .read(&mut byte)
                .await
                .expect("still no reset after the close"),
            0
        );
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}
