//! Backpressure, on each data path (on the kernel path this is the switch between
//! redirecting and passing up to userspace at `max_queued_bytes`):
//! - randomized sizes, read rates and chunk sizes, both directions at once: every byte
//!   arrives once, in order (checksums), and on the kernel path the switch was taken;
//! - a client that reads nothing: the backend cannot push more than a bounded amount into
//!   the proxy; once the client reads, every byte arrives.
//!
//! Replay one randomized round with `BACKPRESSURE_SEED=N`.

use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};
use smartproxy::config::DataPathMode;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bounds one randomized round: a lost byte must fail the test, not hang it.
const ROUND: Duration = Duration::from_secs(120);

/// Small enough that the cap is hit many times per round.
const MAX_QUEUED_BYTES: u64 = 256 * 1024;

/// `[proxy]` keys (the harness writes `rest` right after its own `[proxy]` lines), then
/// the route.
fn config(backend: std::net::SocketAddr) -> String {
    format!(
        "max_queued_bytes = {MAX_QUEUED_BYTES}\n\n[lifecycle]\ninactivity_timeout = \"1h\"\n\n{}",
        plain_route("flow", backend, "")
    )
}

/// How one side of a round reads and writes.
#[derive(Clone, Copy, Debug)]
struct Pace {
    chunk: usize,
    /// Pause after each read chunk: a slow reader.
    read_pause: Duration,
}

impl Pace {
    fn random(rng: &mut StdRng) -> Pace {
        Pace {
            // At least 4 KiB, so that a slow round still ends in seconds.
            chunk: rng.gen_range(4 * 1024..=256 * 1024),
            read_pause: Duration::from_micros(rng.gen_range(0..=2_000)),
        }
    }
}

async fn write_paced(stream: &mut (impl AsyncWrite + Unpin), bytes: &[u8], pace: Pace) {
    for chunk in bytes.chunks(pace.chunk) {
        stream.write_all(chunk).await.expect("write");
    }
    stream.shutdown().await.expect("FIN");
}

async fn read_paced(stream: &mut (impl AsyncRead + Unpin), pace: Pace) -> (usize, [u8; 32]) {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = vec![0; pace.chunk];
    let mut total = 0;
    loop {
        let read = stream.read(&mut buf).await.expect("read");
        if read == 0 {
            return (total, hasher.finalize().into());
        }
        hasher.update(&buf[..read]);
        total += read;
        if !pace.read_pause.is_zero() {
            tokio::time::sleep(pace.read_pause).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_rounds_keep_every_byte_in_order_across_switches() {
    let seeds: Vec<u64> = match std::env::var("BACKPRESSURE_SEED") {
        Ok(seed) => vec![seed.parse().expect("BACKPRESSURE_SEED is a number")],
        Err(_) => (0..6).map(|_| rand::random()).collect(),
    };
    for_each_data_path(|mode| {
        let seeds = seeds.clone();
        async move {
            let (mut kernel_bytes, mut all_bytes) = (0, 0);
            for seed in seeds {
                eprintln!("round seed {seed} (replay with BACKPRESSURE_SEED={seed})");
                let mut rng = StdRng::seed_from_u64(seed);
                let up = pattern(rng.gen_range(1..=24 << 20), seed);
                let down = pattern(rng.gen_range(1..=24 << 20), !seed);
                let (client_pace, backend_pace) = (Pace::random(&mut rng), Pace::random(&mut rng));
                let (up_len, up_hash) = (up.len(), sha256(&up));
                let down_for_backend = down.clone();
                let backend = Backend::spawn(move |stream| {
                    let down = down_for_backend.clone();
                    async move {
                        let (mut read, mut write) = stream.into_split();
                        let sender = tokio::spawn(async move {
                            write_paced(&mut write, &down, backend_pace).await;
                        });
                        let (len, hash) = read_paced(&mut read, backend_pace).await;
                        assert_eq!(len, up_len, "bytes at the backend, seed {seed}");
                        assert_eq!(hash, up_hash, "checksum at the backend, seed {seed}");
                        sender.await.expect("backend sender");
                    }
                })
                .await;
                let mut proxy = TestProxy::start(mode, &config(backend.addr)).await;
                let client = connect(proxy.addr("flow")).await;
                let (mut read, mut write) = client.into_split();
                let sender =
                    tokio::spawn(async move { write_paced(&mut write, &up, client_pace).await });
                let (len, hash) = tokio::time::timeout(ROUND, read_paced(&mut read, client_pace))
                    .await
                    .unwrap_or_else(|_| panic!("round {seed} did not end within {ROUND:?}"));
                assert_eq!(len, down.len(), "bytes at the client, seed {seed}");
                assert_eq!(hash, sha256(&down), "checksum at the client, seed {seed}");
                sender.await.expect("client sender");
                proxy.expect_closed(Reason::Normal).await;
                backend.join().await;
                let bytes = proxy.stats().bytes;
                eprintln!(
                    "  {mode}: kernel moved {} of {} bytes up, {} of {} down",
                    bytes.kernel_client_to_backend,
                    bytes.client_to_backend,
                    bytes.kernel_backend_to_client,
                    bytes.backend_to_client
                );
                kernel_bytes += bytes.kernel_client_to_backend + bytes.kernel_backend_to_client;
                all_bytes += bytes.client_to_backend + bytes.backend_to_client;
                proxy.stop().await;
            }
            // On auto the splice comes in the middle of the flood, once the relay found
            // both sockets empty, and what the kernel moves after it depends on when that
            // was (in some rounds nothing): the auto run checks the bytes alone.
            if mode == DataPathMode::Ebpf {
                // The switch was taken: some bytes went through the kernel, some were
                // passed up and forwarded by userspace.
                assert!(
                    0 < kernel_bytes && kernel_bytes < all_bytes,
                    "kernel moved {kernel_bytes} of {all_bytes} bytes: the switch was not exercised"
                );
            }
        }
    })
    .await;
}

/// On the kernel path a reader that stops must stop the sender too: the kernel may not
/// queue for it without bound (docs/kernel-notes.md#backpressure: over 1 GiB without
/// flow control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_stops_the_backend() {
    const OFFERED: usize = 256 << 20;
    /// Socket buffers of the three sockets between the backend's writes and the client,
    /// plus the cap; far below what an unbounded kernel queue takes.
    const BOUND: usize = 48 << 20;
    for_each_data_path(|mode| async move {
        let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
        let accepted_tx = std::sync::Mutex::new(Some(accepted_tx));
        let backend = Backend::spawn(move |mut stream| {
            let accepted_tx = accepted_tx.lock().expect("lock").take();
            async move {
                let payload = pattern(1 << 20, 7);
                let mut written = 0;
                // Write until nothing moves for a second: the pipe is full.
                while written < OFFERED {
                    match tokio::time::timeout(Duration::from_secs(1), stream.write(&payload)).await
                    {
                        Ok(Ok(n)) => written += n,
                        Ok(Err(e)) => panic!("backend write failed: {e}"),
                        Err(_) => break,
                    }
                }
                if let Some(tx) = accepted_tx {
                    let _ = tx.send(written);
                }
                // The client now drains; finish the offered bytes and close.
                while written < OFFERED {
                    let end = (OFFERED - written).min(payload.len());
                    stream
                        .write_all(&payload[..end])
                        .await
                        .expect("backend write");
                    written += end;
                }
                stream.shutdown().await.expect("backend FIN");
            }
        })
        .await;
        let mut proxy = TestProxy::start(mode, &config(backend.addr)).await;
        let mut client = connect(proxy.addr("flow")).await;
        let stalled_at = tokio::time::timeout(WAIT * 3, accepted_rx)
            .await
            .expect("the backend stalls in time")
            .expect("the backend reports");
        eprintln!("{mode}: the backend stalled after {stalled_at} bytes");
        assert!(
            stalled_at < BOUND,
            "{mode}: {stalled_at} bytes were taken from a backend whose client reads nothing"
        );
        let (len, _) = read_to_end_hashed(&mut client)
            .await
            .expect("client drains");
        assert_eq!(len, OFFERED, "every offered byte reaches the client");
        drop(client);
        proxy.expect_closed(Reason::Normal).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

/// On the kernel path a socket whose bytes the verdict redirects is not watched for reads:
/// passed bytes and FINs reach the relay as ring-buffer events, and a full ring loses
/// some (`docs/kernel-notes.md#read-wake-ups`). With a ring of one page and the cap hit
/// all the time by 16 uploads at once, events are lost, and every connection still
/// delivers every byte and its FIN, and gets the backend's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_stall_no_connection() {
    const STREAMS: usize = 16;
    const UPLOAD: usize = 8 << 20;
    if !ebpf_loads("this test (the event ring buffer is part of the eBPF data path)") {
        return;
    }
    let backend = Backend::spawn(|mut stream| async move {
        let (len, hash) = read_to_end_hashed(&mut stream)
            .await
            .expect("backend reads to the client's FIN");
        let mut answer = (len as u64).to_be_bytes().to_vec();
        answer.extend_from_slice(&hash[..16]);
        stream.write_all(&answer).await.expect("backend answers");
        stream.shutdown().await.expect("backend FIN");
    })
    .await;
    let config = format!("ebpf_ring_buffer_bytes = 4096\n{}", config(backend.addr));
    let proxy = TestProxy::start(DataPathMode::Ebpf, &config).await;
    let uploads = (0..STREAMS).map(|stream| {
        let addr = proxy.addr("flow");
        tokio::spawn(async move {
            let payload = pattern(UPLOAD, stream as u64);
            let mut client = connect(addr).await;
            client.write_all(&payload).await.expect("client writes");
            client.shutdown().await.expect("client FIN");
            let mut answer = Vec::new();
            tokio::time::timeout(ROUND, client.read_to_end(&mut answer))
                .await
                .unwrap_or_else(|_| panic!("stream {stream}: no answer within {ROUND:?}"))
                .expect("client reads the answer");
            let mut expected = (UPLOAD as u64).to_be_bytes().to_vec();
            expected.extend_from_slice(&sha256(&payload)[..16]);
            assert_eq!(answer, expected, "stream {stream}: count and checksum");
        })
    });
    for upload in uploads.collect::<Vec<_>>() {
        upload.await.expect("upload task");
    }
    let stats = proxy.stats();
    assert!(
        stats.ebpf.events_lost > 0,
        "the ring never overflowed, nothing was tested: {:?}",
        stats.ebpf
    );
    proxy.wait_idle().await;
    backend.join().await;
    proxy.stop().await;
}
