//! Half-close through the proxy, over plain TCP on each data path and over TLS the proxy
//! terminates (where a FIN from the client is close_notify + FIN, and the proxy answers a
//! backend FIN with close_notify + FIN):
//! - the client half-closes, then the backend (having read to EOF) streams 5 MiB and
//!   closes: the client gets every byte, then EOF; reason `normal`;
//! - the mirror: the backend half-closes first, then the client streams 5 MiB to it;
//! - after the client's FIN the backend sends a small message every 100 ms for 3 s:
//!   nothing closes, the connection counts as half open meanwhile, every message
//!   arrives, and the backend's close then ends it with `normal`;
//! - `allow_half_open = false` while the backend streams without pause: the client's FIN
//!   makes the proxy finish both directions; the client gets an intact prefix of the
//!   stream, then a clean EOF (not an RST); the backend sees a FIN; `normal`.
//!
//! Each connection first makes a round trip ([`TestProxy::established`]), so that the
//! kernel variant runs spliced, and the kernel variant checks the kernel moved the bytes
//! sent after it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

const FIVE_MIB: usize = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_client_fin_backend_streams_five_mib_then_eof() {
    for_each_frontend(|front| async move {
        let to_client = pattern(FIVE_MIB, 11);
        let expected = sha256(&to_client);
        let backend = Backend::greeted_with(to_client, |mut stream, payload| async move {
            read_request(&mut stream, b"request").await;
            write_chunked(&mut stream, &payload)
                .await
                .expect("backend streams after the client's FIN");
            stream.shutdown().await.expect("backend FIN");
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"request").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        let (len, hash) = within("the client reads to EOF", read_to_end_hashed(&mut client))
            .await
            .expect("client reads after its own FIN");
        assert_eq!(len, FIVE_MIB, "bytes at the client");
        assert_eq!(hash, expected, "checksum at the client");
        proxy
            .finish_closed(Reason::Normal, &[Direction::BackendToClient])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_backend_fin_client_streams_five_mib_then_eof() {
    for_each_frontend(|front| async move {
        let to_backend = pattern(FIVE_MIB, 12);
        let expected = sha256(&to_backend);
        let backend = Backend::greeted(move |mut stream| async move {
            stream.write_all(b"greeting").await.expect("backend writes");
            stream.shutdown().await.expect("backend FIN");
            let (len, hash) = read_to_end_hashed(&mut stream)
                .await
                .expect("backend reads after its own FIN");
            assert_eq!(len, FIVE_MIB, "bytes at the backend");
            assert_eq!(hash, expected, "checksum at the backend");
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        let mut greeting = Vec::new();
        within(
            "the client reads to the backend's FIN",
            client.read_to_end(&mut greeting),
        )
        .await
        .expect("client reads");
        assert_eq!(greeting, b"greeting", "bytes before the backend's FIN");
        within(
            "the client streams",
            write_chunked(&mut client, &to_backend),
        )
        .await
        .expect("client streams after the backend's FIN");
        client.shutdown().await.expect("client FIN");
        proxy
            .finish_closed(Reason::Normal, &[Direction::ClientToBackend])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connection_stays_open_while_the_backend_keeps_sending_for_three_seconds() {
    const TICKS: usize = 30;
    for_each_frontend(|front| async move {
        // The backend closes only when told to, after the last tick was checked.
        let release = Arc::new(Notify::new());
        let backend =
            Backend::greeted_with(Arc::clone(&release), |mut stream, release| async move {
                read_request(&mut stream, b"subscribe").await;
                send_ticks(&mut stream, TICKS, Duration::from_millis(100)).await;
                release.notified().await;
                stream.shutdown().await.expect("backend FIN");
            })
            .await;
        let (mut proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"subscribe").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        for index in 0..TICKS {
            read_tick(&mut client, index).await;
            proxy.assert_nothing_closed();
            let connections = proxy.stats().connections;
            assert_eq!(connections.active, 1, "active connections at tick {index}");
            assert_eq!(
                connections.half_open, 1,
                "half-open connections at tick {index}"
            );
        }
        release.notify_one();
        expect_eof(&mut client, "the client reads to the backend's FIN").await;
        proxy.expect_closed(Reason::Normal).await;
        assert_eq!(
            proxy.stats().connections.half_open,
            0,
            "half open after the close"
        );
        proxy.assert_kernel_moved(Direction::BackendToClient);
        proxy.finish().await;
    })
    .await;
}

/// Byte `offset` of the endless stream the backend of the forced-finish test sends: any
/// prefix of it can be checked.
fn stream_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_half_open_client_fin_while_the_backend_streams_ends_with_fin_both_ways() {
    // What the client reads before its FIN: the proxy is then surely moving the stream.
    const BEFORE_FIN: usize = 1024 * 1024;
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(|stream| async move {
            let (mut read, mut write) = stream.into_split();
            let fin_seen = Arc::new(AtomicBool::new(false));
            let writer = tokio::spawn({
                let fin_seen = Arc::clone(&fin_seen);
                async move {
                    let mut offset = 0u64;
                    let mut chunk = vec![0u8; 64 * 1024];
                    while !fin_seen.load(Ordering::SeqCst) {
                        for (i, byte) in chunk.iter_mut().enumerate() {
                            *byte = stream_byte(offset + i as u64);
                        }
                        // Fails once the proxy closed its socket with bytes unread (an
                        // RST): what follows the forced finish is not this test's point.
                        if write.write_all(&chunk).await.is_err() {
                            return;
                        }
                        offset += chunk.len() as u64;
                    }
                    let _ = write.shutdown().await;
                }
            });
            let mut rest = Vec::new();
            match read.read_to_end(&mut rest).await {
                Ok(_) => assert!(rest.is_empty(), "{} bytes after the greeting", rest.len()),
                Err(e) => panic!("the backend expected the proxy's FIN, got error {e}"),
            }
            fin_seen.store(true, Ordering::SeqCst);
            within("the backend's writer stops", writer)
                .await
                .expect("backend writer");
        })
        .await;
        let (mut proxy, mut client) =
            Spliced::start(&front, "[lifecycle]\nallow_half_open = false\n", backend).await;
        let mut received = vec![0u8; BEFORE_FIN];
        within("the stream arrives", client.read_exact(&mut received))
            .await
            .expect("client reads the stream");
        client.shutdown().await.expect("client FIN");
        // A pause in the reading: the stream toward the client backs up in the proxy, so
        // the forced finish meets a full queue toward the client with the backend still
        // sending.
        tokio::time::sleep(Duration::from_millis(300)).await;
        within("the client reads to EOF", client.read_to_end(&mut received))
            .await
            .expect("a clean EOF after the client's FIN, not an RST");
        if let Some(offset) = (0..received.len()).find(|&i| received[i] != stream_byte(i as u64)) {
            panic!(
                "byte {offset} of {} at the client is not the backend's",
                received.len()
            );
        }
        proxy.expect_closed(Reason::Normal).await;
        // The backend streams from the greeting on, so the kernel may have moved much of
        // the stream already when the scenario read its baseline: count from zero.
        TestProxy::assert_kernel_moved(&proxy, [0, 0], Direction::BackendToClient);
        proxy.finish().await;
    })
    .await;
}
