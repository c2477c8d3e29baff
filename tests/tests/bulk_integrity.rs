//! Bulk transfers through the kernel path at the default cap, each way: every byte
//! arrives once and in order (length and sha256), while the connection keeps switching
//! between redirecting and passing (a receiver that hashes what it reads lags behind).
//!
//! On this kernel a segment retransmitted over bytes already received is handed whole to
//! the verdict; before the verdict trimmed what it had already seen, the overlap (one
//! loopback skb, 65,483 bytes) reached the receiver twice in most runs of this test.

use smartproxy::config::DataPathMode;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 256 << 20;
const CHUNK: usize = 1 << 20;

/// The stream both ends agree on: `SIZE / CHUNK` copies of one pseudo-random chunk.
fn expected() -> (usize, [u8; 32]) {
    use sha2::{Digest, Sha256};
    let chunk = pattern(CHUNK, 7);
    let mut hasher = Sha256::new();
    for _ in 0..SIZE / CHUNK {
        hasher.update(&chunk);
    }
    (SIZE, hasher.finalize().into())
}

/// One transfer of the stream through a kernel-path proxy (default `max_queued_bytes`);
/// returns the length and sha256 the receiver got.
async fn transfer(upload: bool) -> (usize, [u8; 32]) {
    let backend = Backend::spawn(move |stream| async move {
        let (mut read, mut write) = stream.into_split();
        if upload {
            let (len, hash) = read_to_end_hashed(&mut read).await.expect("backend reads");
            write
                .write_all(&(len as u64).to_be_bytes())
                .await
                .expect("report");
            write.write_all(&hash).await.expect("report");
        } else {
            let chunk = pattern(CHUNK, 7);
            for _ in 0..SIZE / CHUNK {
                write.write_all(&chunk).await.expect("backend writes");
            }
            write.shutdown().await.expect("backend FIN");
            let _ = read.read_to_end(&mut Vec::new()).await;
        }
    })
    .await;
    let mut proxy =
        TestProxy::start(DataPathMode::Ebpf, &plain_route("bulk", backend.addr, "")).await;
    let (mut read, mut write) = connect(proxy.addr("bulk")).await.into_split();
    let received = if upload {
        let chunk = pattern(CHUNK, 7);
        for _ in 0..SIZE / CHUNK {
            write.write_all(&chunk).await.expect("client writes");
        }
        write.shutdown().await.expect("client FIN");
        let mut report = [0u8; 40];
        within("the backend's report", read.read_exact(&mut report))
            .await
            .expect("the backend's report");
        let len = u64::from_be_bytes(report[..8].try_into().expect("8 bytes")) as usize;
        (len, report[8..].try_into().expect("32 bytes"))
    } else {
        let received = read_to_end_hashed(&mut read).await.expect("client reads");
        write.shutdown().await.expect("client FIN");
        received
    };
    proxy.next_closed().await;
    proxy.stop().await;
    backend.join().await;
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_at_the_default_cap_delivers_every_byte_once() {
    init_tracing();
    if !ebpf_loads("this test (it needs the eBPF data path)") {
        return;
    }
    let expected = expected();
    for round in 0..2 {
        for upload in [true, false] {
            let (len, hash) = transfer(upload).await;
            assert_eq!(len, expected.0, "length, round {round}, upload {upload}");
            assert!(hash == expected.1, "sha256, round {round}, upload {upload}");
        }
    }
}
