//! A cut stream must look cut: when a grace period ends (after a shutdown, or a graceful
//! close that did not finish in time), a connection whose two directions both finished
//! ends with a FIN, and any other is reset on both sides, idle or not. Each kernel variant
//! is spliced first.

use std::time::Duration;

use smartproxy::config::DataPathMode;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A [`Spliced`] scenario on `mode` with `lifecycle`, whose one connection is the only
/// one the proxy has.
async fn spliced(mode: DataPathMode, lifecycle: &str, backend: Backend) -> (Spliced, TcpStream) {
    let (proxy, client) = Spliced::start(&Frontend::Plain(mode), lifecycle, backend).await;
    let rows = proxy.proxy.connection_rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    (proxy, client.into_tcp())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resets_both_sides_of_a_stream_still_open_at_the_end_of_grace() {
    for_each_data_path(|mode| async move {
        let backend = Backend::greeted(|mut stream| async move {
            expect_reset(&mut stream).await;
        })
        .await;
        let (proxy, mut client) =
            spliced(mode, "[lifecycle]\ngrace_period = \"300ms\"\n", backend).await;
        proxy.proxy.shutdown();
        // Idle at the end of grace, as far as the proxy can tell: still cut.
        expect_reset(&mut client).await;
        proxy.finish_closed(Reason::Shutdown, &[]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_resets_a_half_closed_stream_at_the_end_of_grace() {
    for_each_data_path(|mode| async move {
        let backend = Backend::greeted(|mut stream| async move {
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .await
                .expect("the client's FIN");
            // Never ends backend->client: the proxy must cut it.
            expect_reset_after_eof(&stream).await;
        })
        .await;
        let (proxy, client) =
            spliced(mode, "[lifecycle]\ngrace_period = \"300ms\"\n", backend).await;
        let (mut read, mut write) = client.into_split();
        write.shutdown().await.expect("client FIN");
        proxy.proxy.shutdown();
        expect_reset(&mut read).await;
        proxy.finish_closed(Reason::Shutdown, &[]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_close_whose_directions_both_finished_ends_with_fin() {
    for_each_data_path(|mode| async move {
        // The backend reads the proxy's FIN and then keeps its own side open past grace.
        let backend = Backend::greeted(|mut stream| async move {
            let mut rest = Vec::new();
            stream
                .read_to_end(&mut rest)
                .await
                .expect("a FIN, not a reset");
            tokio::time::sleep(Duration::from_millis(600)).await;
        })
        .await;
        let lifecycle = "[lifecycle]\ninactivity_timeout = \"300ms\"\n\
                         timeout_behavior = \"close\"\ngrace_period = \"200ms\"\n";
        let (mut proxy, mut client) = spliced(mode, lifecycle, backend).await;
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
        proxy.finish().await;
    })
    .await;
}
