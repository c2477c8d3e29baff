//! Faults, on each data path where they apply:
//! - a backend reset in the middle of a transfer toward the client: the client sees the
//!   RST (or EOF) within 1 s of it, reason `backend_reset`;
//! - the same while the client is the one sending;
//! - eBPF only: the event ring buffer overflows (one page, many connections closing at
//!   once): events are counted as lost, yet every connection closes and nothing stays
//!   behind (sockhash entries, table records, descriptors); parked splices check their
//!   sockets from the parking lot and stay parked, then serve on.
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

/// Connections of each burst that [`overflow_ring`] opens and closes at once.
const BURST: usize = 400;

/// `[proxy]` lines of a ring buffer of one page: 128 events, and each connection makes
/// several as it closes.
const ONE_PAGE_RING: &str = "ebpf_ring_buffer_bytes = 4096\n";

/// Opens [`BURST`] connections on `route`, a round trip each, and closes them all at once,
/// until the ring buffer lost events (three tries); waits each time until only `staying`
/// connections are left.
async fn overflow_ring(proxy: &TestProxy, route: &str, staying: u64) {
    for _ in 0..3 {
        let mut clients = Vec::with_capacity(BURST);
        for _ in 0..BURST {
            clients.push(connect(proxy.addr(route)).await);
        }
        for (index, client) in clients.iter_mut().enumerate() {
            client.write_all(&tick(index)).await.expect("client writes");
            read_tick(client, index).await;
        }
        assert_eq!(
            proxy.stats().connections.ebpf,
            BURST as u64 + staying,
            "every connection is spliced"
        );
        // Every client closes at once: FIN, then the echo backend's FIN, both ways.
        drop(clients);
        wait_for("the burst to close", || {
            proxy.stats().connections.active == staying
        })
        .await;
        if proxy.stats().ebpf.events_lost > 0 {
            return;
        }
    }
    panic!("the ring buffer never overflowed: {:?}", proxy.stats().ebpf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_buffer_overflow_loses_events_but_nothing_leaks() {
    init_tracing();
    if !ebpf_loads("this test (the ring buffer is part of the eBPF data path)") {
        return;
    }
    let backend = Backend::spawn(echo).await;
    let config = format!(
        "{ONE_PAGE_RING}\n{}",
        plain_route("burst", backend.addr, "")
    );
    let proxy = TestProxy::start(DataPathMode::Ebpf, &config).await;
    let baseline = open_fds();
    overflow_ring(&proxy, "burst", 0).await;
    // Every kernel map empty, counted in the kernel.
    proxy.wait_idle().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_leave_parked_splices_parked() {
    init_tracing();
    if !ebpf_loads("this test (parked splices hear of lost events)") {
        return;
    }
    const PARKED: usize = 20;
    let backend = Backend::spawn(echo).await;
    // A second: the burst's connections close before they would park, so that the
    // parked count is the 20's alone.
    let config = format!(
        "{ONE_PAGE_RING}park_idle_after = \"1s\"\n\n{}",
        plain_route("burst", backend.addr, "")
    );
    let proxy = Arc::new(TestProxy::start(DataPathMode::Ebpf, &config).await);
    let mut parked = Vec::with_capacity(PARKED);
    for index in 0..PARKED {
        let mut client = connect(proxy.addr("burst")).await;
        client.write_all(&tick(index)).await.expect("client writes");
        read_tick(&mut client, index).await;
        parked.push(client);
    }
    proxy.wait_parked(PARKED as u64).await;

    // A loss tells every splice to check its sockets: the parked ones check from the lot,
    // find nothing, and stay parked throughout (taken up, each would stay awake until the
    // next sweep, up to 0.5 s, which the sampling every 5 ms sees).
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let fewest = {
        let (proxy, watching) = (Arc::clone(&proxy), Arc::clone(&watching));
        tokio::spawn(async move {
            let mut fewest = u64::MAX;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                fewest = fewest.min(proxy.stats().connections.parked);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            fewest
        })
    };
    overflow_ring(&proxy, "burst", PARKED as u64).await;
    // The reader compares the loss counter at most a second after it read events.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let fewest = fewest.await.expect("the sampling task");
    assert!(
        fewest >= PARKED as u64,
        "the parked splices fell to {fewest} of {PARKED} during the loss"
    );

    // They serve on, and close normally.
    for (index, client) in parked.iter_mut().enumerate() {
        client.write_all(&tick(index)).await.expect("client writes");
        read_tick(client, index).await;
    }
    drop(parked);
    proxy.wait_idle().await;
    backend.join().await;
    match Arc::try_unwrap(proxy) {
        Ok(proxy) => proxy.stop().await,
        Err(_) => panic!("the sampling task still holds the proxy"),
    }
}
