//! Resets through the proxy, over plain TCP on each data path and over TLS the proxy
//! terminates (an RST is an RST, whatever ran over the connection):
//! - the client resets: the backend sees ECONNRESET, reason `client_reset`;
//! - the backend resets: the client sees ECONNRESET, reason `backend_reset`;
//! - after the client's FIN the backend resets: the client, still reading, sees the
//!   reset; reason `backend_reset`;
//! - after the client's FIN the client resets: the backend, which already read that
//!   FIN, sees the reset; reason `client_reset`.

use std::sync::Arc;

use smartproxy::lifecycle::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_backend() {
    for_each_frontend(|front| async move {
        let backend = Backend::spawn(|mut stream| async move {
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await.expect("backend reads");
            stream.write_all(b"ready").await.expect("backend writes");
            expect_reset(&mut stream).await;
        })
        .await;
        let mut proxy =
            TestProxy::start(front.data_path(), &front.route("rst", backend.addr, "")).await;
        let mut client = front.connect(proxy.addr("rst")).await;
        client.write_all(b"hello").await.expect("client writes");
        let mut ready = [0u8; 5];
        within("the backend answers", client.read_exact(&mut ready))
            .await
            .expect("client reads");
        client.reset();
        proxy.expect_closed(Reason::ClientReset).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_resets_the_client() {
    for_each_frontend(|front| async move {
        let backend = Backend::spawn(|mut stream| async move {
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await.expect("backend reads");
            reset(stream);
        })
        .await;
        let mut proxy =
            TestProxy::start(front.data_path(), &front.route("rst", backend.addr, "")).await;
        let mut client = front.connect(proxy.addr("rst")).await;
        client.write_all(b"hello").await.expect("client writes");
        expect_reset(&mut client).await;
        proxy.expect_closed(Reason::BackendReset).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_after_client_fin_resets_the_client() {
    for_each_frontend(|front| async move {
        let backend = Backend::spawn(|mut stream| async move {
            let mut request = Vec::new();
            stream
                .read_to_end(&mut request)
                .await
                .expect("backend reads up to the client's FIN");
            assert_eq!(request, b"hello", "bytes before the client's FIN");
            reset(stream);
        })
        .await;
        let mut proxy =
            TestProxy::start(front.data_path(), &front.route("rst", backend.addr, "")).await;
        let mut client = front.connect(proxy.addr("rst")).await;
        client.write_all(b"hello").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        expect_reset(&mut client).await;
        proxy.expect_closed(Reason::BackendReset).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_after_client_fin_resets_the_backend() {
    for_each_frontend(|front| async move {
        // The backend says when it has read the client's FIN; only then does the client
        // reset, so the proxy's side of the client socket is already at EOF.
        let fin_seen = Arc::new(Notify::new());
        let backend =
            Backend::spawn_with(Arc::clone(&fin_seen), |mut stream, fin_seen| async move {
                let mut request = Vec::new();
                stream
                    .read_to_end(&mut request)
                    .await
                    .expect("backend reads up to the client's FIN");
                assert_eq!(request, b"hello", "bytes before the client's FIN");
                fin_seen.notify_one();
                expect_reset_after_eof(&stream).await;
            })
            .await;
        let mut proxy =
            TestProxy::start(front.data_path(), &front.route("rst", backend.addr, "")).await;
        let mut client = front.connect(proxy.addr("rst")).await;
        client.write_all(b"hello").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        within("the backend reads the client's FIN", fin_seen.notified()).await;
        client.reset();
        proxy.expect_closed(Reason::ClientReset).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}
