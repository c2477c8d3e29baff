//! Faults, on each data path where they apply:
//! - a backend reset in the middle of a transfer toward the client: the client sees the
//!   RST (or EOF) within 1 s of it, reason `backend_reset`;
//! - the same while the client is the one sending;
//! - eBPF only: the event ring buffer overflows (one page, many connections closing at
//!   once): events are counted as lost, yet every connection closes and nothing stays
//!   behind (sockhash entries, table records, descriptors).
//!
//! The reset cases first make a round trip ([`TestProxy::established`]), so that the
//! kernel variant runs spliced, and the kernel variant checks the kernel moved the bytes
//! sent after it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smartproxy::config::DataPathMode;
use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How soon after a backend's reset the client must learn of it.
const NOTICE: Duration = Duration::from_secs(1);

/// When the backend reset its connection.
type ResetAt = Arc<Mutex<Option<Instant>>>;

fn reset_now(stream: TcpStream, at: &ResetAt) {
    *at.lock().expect("reset time") = Some(Instant::now());
    reset(stream);
}

/// Reads until the stream ends (RST or EOF) and returns when that was.
async fn read_until_gone(stream: &mut TcpStream) -> Instant {
    let mut buf = vec![0u8; 64 * 1024];
    within("the client learns of the reset", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
}

fn assert_noticed(reset_at: &ResetAt, noticed: Instant) {
    let reset_at = reset_at
        .lock()
        .expect("reset time")
        .expect("the backend reset");
    let after = noticed.saturating_duration_since(reset_at);
    assert!(
        after < NOTICE,
        "the client learned of the reset {after:?} later"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_while_sending_reaches_the_client_within_a_second() {
    for_each_data_path(|mode| async move {
        let reset_at = ResetAt::default();
        let backend = Backend::greeted_with(reset_at.clone(), |mut stream, at| async move {
            // Only once the client saw the connection established: a reset before would
            // end it before the test looked at it.
            let mut go = [0u8; 2];
            stream.read_exact(&mut go).await.expect("backend reads");
            let chunk = pattern(64 * 1024, 1);
            for _ in 0..16 {
                stream.write_all(&chunk).await.expect("backend writes");
            }
            reset_now(stream, &at);
        })
        .await;
        let (mut proxy, client) = Spliced::start(&Frontend::Plain(mode), "", backend).await;
        let mut client = client.into_tcp();
        client.write_all(b"go").await.expect("client writes");
        let noticed = read_until_gone(&mut client).await;
        assert_noticed(&reset_at, noticed);
        proxy.expect_closed(Reason::BackendReset).await;
        proxy.assert_kernel_moved(Direction::BackendToClient);
        assert_eq!(proxy.stats().closed(Reason::BackendReset), 1, "counted");
        proxy.finish().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_while_receiving_reaches_the_client_within_a_second() {
    for_each_data_path(|mode| async move {
        let reset_at = ResetAt::default();
        let backend = Backend::greeted_with(reset_at.clone(), |mut stream, at| async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < 1024 * 1024 {
                total += stream.read(&mut buf).await.expect("backend reads");
            }
            reset_now(stream, &at);
        })
        .await;
        let (proxy, client) = Spliced::start(&Frontend::Plain(mode), "", backend).await;
        let client = client.into_tcp();
        let (mut read, mut write) = client.into_split();
        // The client keeps sending until the proxy passes the reset on.
        let sender = tokio::spawn(async move {
            let chunk = pattern(64 * 1024, 2);
            while write.write_all(&chunk).await.is_ok() {}
        });
        let mut buf = [0u8; 1024];
        let noticed = within("the client learns of the reset", async {
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert_noticed(&reset_at, noticed);
        within("the sender stops", sender)
            .await
            .expect("sender task");
        proxy
            .finish_closed(Reason::BackendReset, &[Direction::ClientToBackend])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_buffer_overflow_loses_events_but_nothing_leaks() {
    init_tracing();
    if !ebpf_loads("this test (the ring buffer is part of the eBPF data path)") {
        return;
    }
    const CONNECTIONS: usize = 400;
    let backend = Backend::spawn(echo).await;
    // One page holds 128 events; each connection makes several as it closes.
    let config = format!(
        "ebpf_ring_buffer_bytes = 4096\n\n{}",
        plain_route("burst", backend.addr, "")
    );
    let proxy = TestProxy::start(DataPathMode::Ebpf, &config).await;
    let baseline = open_fds();
    for _ in 0..3 {
        let mut clients = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            clients.push(connect(proxy.addr("burst")).await);
        }
        for (index, client) in clients.iter_mut().enumerate() {
            client.write_all(&tick(index)).await.expect("client writes");
            read_tick(client, index).await;
        }
        assert_eq!(
            proxy.stats().connections.ebpf as usize,
            CONNECTIONS,
            "every connection is spliced"
        );
        // Every client closes at once: FIN, then the echo backend's FIN, both ways.
        drop(clients);
        proxy.wait_idle().await;
        if proxy.stats().ebpf.events_lost > 0 {
            break;
        }
    }
    let stats = proxy.stats();
    assert!(
        stats.ebpf.events_lost > 0,
        "the ring buffer never overflowed: {:?}",
        stats.ebpf
    );
    // `wait_idle` above found every kernel map empty, counted in the kernel.
    assert!(
        proxy.proxy.connection_rows().is_empty(),
        "the table is empty"
    );
    wait_for("the descriptors are back to the baseline", || {
        open_fds() <= baseline
    })
    .await;
    backend.join().await;
    proxy.stop().await;
}
