//! Bulk transfer through the proxy, on each data path:
//! - 64 MiB each way at once, checksums compared;
//! - 50 parallel connections, each with its own payload;
//! - bytes the backend sends first (server-first protocols) reach the client;
//! - bytes a client sends before the proxy reaches the backend arrive first and intact.

use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: usize = 64 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_arrive_intact() {
    for_each_data_path(|mode| async move {
        let to_backend = pattern(BIG, 1);
        let to_client = pattern(BIG, 2);
        let expected_at_backend = sha256(&to_backend);
        let backend_payload = to_client.clone();
        let backend = Backend::spawn(move |stream| {
            let payload = backend_payload.clone();
            async move {
                let (mut read, mut write) = stream.into_split();
                let sender = tokio::spawn(async move {
                    write_chunked(&mut write, &payload)
                        .await
                        .expect("backend writes");
                    write.shutdown().await.expect("backend FIN");
                });
                let (len, hash) = read_to_end_hashed(&mut read).await.expect("backend reads");
                assert_eq!(len, BIG, "bytes at the backend");
                assert_eq!(hash, expected_at_backend, "checksum at the backend");
                sender.await.expect("backend sender");
            }
        })
        .await;
        let mut proxy = TestProxy::start(mode, &plain_route("bulk", backend.addr, "")).await;
        let client = connect(proxy.addr("bulk")).await;
        let (mut read, mut write) = client.into_split();
        let sender = tokio::spawn(async move {
            write_chunked(&mut write, &to_backend)
                .await
                .expect("client writes");
            write.shutdown().await.expect("client FIN");
        });
        let (len, hash) = read_to_end_hashed(&mut read).await.expect("client reads");
        assert_eq!(len, BIG, "bytes at the client");
        assert_eq!(hash, sha256(&to_client), "checksum at the client");
        sender.await.expect("client sender");
        proxy.expect_closed(smartproxy::vocab::Reason::Normal).await;
        let stats = proxy.stats();
        assert_eq!(stats.bytes.client_to_backend, BIG as u64);
        assert_eq!(stats.bytes.backend_to_client, BIG as u64);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_connections_each_get_their_own_bytes() {
    for_each_data_path(|mode| async move {
        // An echo backend: whatever arrives goes back, then FIN after the client's FIN.
        let backend = Backend::spawn(|stream| async move {
            let (mut read, mut write) = stream.into_split();
            tokio::io::copy(&mut read, &mut write).await.expect("echo");
            write.shutdown().await.expect("echo FIN");
        })
        .await;
        let proxy = TestProxy::start(mode, &plain_route("echo", backend.addr, "")).await;
        let addr = proxy.addr("echo");
        let clients = (0..50u64).map(|seed| {
            tokio::spawn(async move {
                let payload = pattern(256 * 1024 + seed as usize, seed);
                let stream = connect(addr).await;
                let (mut read, mut write) = stream.into_split();
                let expected = sha256(&payload);
                let sender = tokio::spawn(async move {
                    write_chunked(&mut write, &payload)
                        .await
                        .expect("client writes");
                    write.shutdown().await.expect("client FIN");
                });
                let (len, hash) = read_to_end_hashed(&mut read).await.expect("client reads");
                assert_eq!(
                    len,
                    256 * 1024 + seed as usize,
                    "echoed bytes of client {seed}"
                );
                assert_eq!(hash, expected, "echo checksum of client {seed}");
                sender.await.expect("sender");
            })
        });
        for client in clients.collect::<Vec<_>>() {
            client.await.expect("client task");
        }
        proxy.wait_idle().await;
        let stats = proxy.stats();
        assert_eq!(stats.closed(smartproxy::vocab::Reason::Normal), 50);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_backend_sends_first_reach_the_client() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(|mut stream| async move {
            stream.write_all(b"220 hello\r\n").await.expect("greeting");
            let mut reply = [0u8; 4];
            stream.read_exact(&mut reply).await.expect("client reply");
            assert_eq!(&reply, b"QUIT");
        })
        .await;
        let proxy = TestProxy::start(mode, &plain_route("greet", backend.addr, "")).await;
        let mut client = connect(proxy.addr("greet")).await;
        let mut greeting = [0u8; 11];
        client
            .read_exact(&mut greeting)
            .await
            .expect("greeting through the proxy");
        assert_eq!(&greeting, b"220 hello\r\n");
        client.write_all(b"QUIT").await.expect("client writes");
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

/// The first target never answers, so a client's first bytes wait in the proxy's socket
/// until the connect timeout moves on to the backend. On the kernel path the verdict
/// passes them up at the splice and the relay forwards them ahead of what the kernel
/// moves later; a reordered, lost or doubled byte changes the checksum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_backend_is_reached_arrive_first_and_intact() {
    const EARLY: usize = 8 * 1024 * 1024;
    for_each_data_path(|mode| async move {
        let silent = tokio::task::spawn_blocking(SilentTarget::bind)
            .await
            .expect("a silent target");
        let payload = pattern(EARLY, 3);
        let expected = sha256(&payload);
        let backend = Backend::spawn(move |stream| async move {
            let (mut read, _write) = stream.into_split();
            let (len, hash) = read_to_end_hashed(&mut read).await.expect("backend reads");
            assert_eq!(len, EARLY, "bytes at the backend");
            assert_eq!(hash, expected, "checksum at the backend");
        })
        .await;
        let route = plain_route_to(
            "early",
            &[silent.addr, backend.addr],
            "connect_timeout = \"300ms\"",
        );
        let mut proxy = TestProxy::start(mode, &route).await;
        // Round-robin starts each connection at another target: one of the two waits.
        for _ in 0..2 {
            // The backend only reads: the client can write it all before it reads.
            let mut client = connect(proxy.addr("early")).await;
            write_chunked(&mut client, &payload)
                .await
                .expect("client writes");
            close_normally(&mut proxy, client).await;
        }
        assert_eq!(proxy.stats().ebpf.splice_failures, 0);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}
