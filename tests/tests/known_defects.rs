//! Reproducers of known, open defects. Each is `#[ignore]`d because it fails today: run
//! them with `cargo test --release -p smartproxy-tests --test known_defects -- --ignored`.
//! A fix makes one pass; then it loses its `#[ignore]` and joins the suite.

use smartproxy::config::DataPathMode;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

/// One bulk transfer of [`SIZE`] bytes through an ebpf proxy with `max_queued_bytes =
/// cap`; returns the bytes the receiver got.
async fn bulk(cap: u64, upload: bool) -> usize {
    let backend = Backend::spawn(move |stream| async move {
        let (mut read, mut write) = stream.into_split();
        if upload {
            let (len, _) = read_to_end_hashed(&mut read).await.expect("backend reads");
            write
                .write_all(&(len as u64).to_be_bytes())
                .await
                .expect("backend reports");
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
    let mut proxy = TestProxy::start(
        DataPathMode::Ebpf,
        &format!(
            "max_queued_bytes = {cap}\n\n{}",
            plain_route("bulk", backend.addr, "")
        ),
    )
    .await;
    let (mut read, mut write) = connect(proxy.addr("bulk")).await.into_split();
    let received = if upload {
        let chunk = pattern(CHUNK, 7);
        for _ in 0..SIZE / CHUNK {
            write.write_all(&chunk).await.expect("client writes");
        }
        write.shutdown().await.expect("client FIN");
        let mut len = [0u8; 8];
        read.read_exact(&mut len)
            .await
            .expect("the backend's report");
        u64::from_be_bytes(len) as usize
    } else {
        let (len, _) = read_to_end_hashed(&mut read).await.expect("client reads");
        write.shutdown().await.expect("client FIN");
        len
    };
    proxy.next_closed().await;
    proxy.stop().await;
    backend.join().await;
    received
}

/// Open (issue 4): with both redirected and passed bytes in volume (a hashing reader at
/// the default 16 MiB cap; 4 MiB too, less often), the stream verdict is run twice on one
/// skb now and then: `redirected + passed` exceeds what the sender sent by exactly one
/// loopback skb (65,483 bytes), and the receiver gets those bytes twice. Seen in most runs
/// of 8 transfers here; never at a 64 KiB cap (nearly all passed) nor at 256 MiB (nearly
/// all redirected), nor on the userspace path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known defect, fails today: a duplicated skb under mixed redirect/pass (README)"]
async fn mixed_redirect_and_pass_delivers_every_byte_once() {
    init_tracing();
    for round in 0..4 {
        for upload in [true, false] {
            let received = bulk(16 << 20, upload).await;
            assert_eq!(received, SIZE, "round {round}, upload {upload}");
        }
    }
}
