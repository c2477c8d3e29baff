//! Idle connections parked without a task (`smartproxy/src/park/mod.rs`): a connection
//! that moves nothing for `park_idle_after` gives its task up, and whatever comes next
//! takes it up again where it stopped:
//! - on every frontend, one connection through its whole life: it parks (plain TCP, on
//!   the relay or spliced) or never does (TLS the proxy terminates); the client's bytes
//!   wake it on the relay, then the backend's (sent only once it is parked again), then
//!   the client's FIN, and it closes `normal` with every byte delivered. Spliced, the
//!   kernel moves the bytes each way while it stays parked, and the FIN's event takes it
//!   up;
//! - a backend's RST while parked reaches the client, reason `backend_reset`, on each
//!   data path;
//! - on `auto`, a parked connection still moves into the kernel when a flood comes, and
//!   one that left the kernel for pass mode parks there and its next bytes take it up;
//! - a connection with heartbeats stops parking between them, and parks again once they
//!   stop;
//! - a parked connection's inactivity timeout still closes it on time;
//! - a shutdown takes parked connections up: each drains and closes `shutdown`;
//! - `park_idle_after = "0s"` parks nothing, and a reload that sets a delay parks.
//!
//! `tests/tests/limits.rs` checks that parked connections keep their admission slots, and
//! `tests/tests/park_failure.rs` what a take-up that fails does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smartproxy::config::DataPathMode;
use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// `auto` knobs that splice at 1 MiB/s within 50 ms, far below what a flood reaches
/// whatever the build, and leave the kernel below 256 KiB/s, as soon as a flood ends. One
/// direction is enough: with both required, the policy says yes only in windows where
/// both reached the rate, a splice must also find neither direction holding bytes, and
/// the echoed flood here ended without a splice once that rule came in
/// (`tests/tests/adaptive.rs` tests the rule itself).
const AUTO_FLOOD_KNOBS: &str = "auto_splice_rate = 1048576\nauto_splice_one_way = true\n\
                                auto_leave_rate = 262144\nauto_window = \"50ms\"";

/// Longer than [`PARK_SOON`]'s delay plus its sweep (100 ms): a connection quiet for this
/// long is parked, if it ever parks.
const PARKED_BY: Duration = Duration::from_millis(1000);

/// Longer than the default park delay (1 s) plus its sweep (0.5 s).
const PARKED_BY_DEFAULT: Duration = Duration::from_millis(2500);

/// Whether connections on `front` park: plain TCP, on any data path (on `auto` the
/// harness's connections splice with no move left, so they have no window to measure).
fn parks(front: &Frontend) -> bool {
    matches!(front, Frontend::Plain(_))
}

/// Waits until the proxy's one connection is parked, or, where connections never park,
/// checks after [`PARKED_BY`] that it did not.
async fn settle(proxy: &TestProxy, parks: bool) {
    if parks {
        proxy.wait_parked(1).await;
    } else {
        tokio::time::sleep(PARKED_BY).await;
        assert_eq!(
            proxy.stats().connections.parked,
            0,
            "a connection that must keep its task parked"
        );
    }
}

/// Echoes 4-byte words; on `push`, notifies `got` and echoes only once `go` is notified.
/// Answers the client's FIN with its own.
async fn pushing_echo(mut stream: TcpStream, (got, go): (Arc<Notify>, Arc<Notify>)) {
    let mut word = [0u8; 4];
    while stream.read_exact(&mut word).await.is_ok() {
        if &word == b"push" {
            got.notify_one();
            go.notified().await;
        }
        stream.write_all(&word).await.expect("backend echoes");
    }
    stream.shutdown().await.expect("backend FIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_parks_and_either_side_takes_it_up() {
    for_each_frontend(|front| async move {
        let parks = parks(&front);
        let (got, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let backend =
            Backend::greeted_with((Arc::clone(&got), Arc::clone(&go)), pushing_echo).await;
        let (proxy, mut client) = Spliced::start(&front, PARK_SOON, backend).await;
        settle(&proxy, parks).await;

        // The client's bytes wake it; spliced, the kernel moves them both ways while it
        // stays parked.
        round_trip(&mut client, b"ping").await;
        if splices(front.data_path()) && parks {
            assert_eq!(
                proxy.stats().connections.parked,
                1,
                "a spliced connection was taken up for bytes the kernel moved"
            );
        }
        settle(&proxy, parks).await;

        // The backend's, sent only once it parked again: after the client's `push`
        // reached the backend (taking it up on the relay; spliced, the kernel moved it).
        client.write_all(b"push").await.expect("client sends push");
        within("the backend reads push", got.notified()).await;
        settle(&proxy, parks).await;
        go.notify_one();
        let mut pushed = [0u8; 4];
        within("the backend's bytes", client.read_exact(&mut pushed))
            .await
            .expect("client reads push");
        assert_eq!(&pushed, b"push", "what the backend sent while parked");
        settle(&proxy, parks).await;

        // The client's FIN.
        proxy.client_closes(&mut client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_while_parked_reaches_the_client() {
    for_each_data_path(|mode| async move {
        let go = Arc::new(Notify::new());
        let backend =
            Backend::greeted_with(Arc::clone(&go), |stream, go: Arc<Notify>| async move {
                go.notified().await;
                reset(stream);
            })
            .await;
        let front = Frontend::Plain(mode);
        let (proxy, mut client) = Spliced::start(&front, PARK_SOON, backend).await;
        settle(&proxy, true).await;
        go.notify_one();
        expect_reset(&mut client).await;
        proxy.finish_closed(Reason::BackendReset, &[]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_on_auto_still_moves_into_the_kernel() {
    if !ebpf_loads("a move into the kernel after parking") {
        return;
    }
    init_tracing();
    let backend = Backend::spawn(echo).await;
    let route = plain_route("parked", backend.addr, "");
    let mut proxy = TestProxy::start_auto(AUTO_FLOOD_KNOBS, &route).await;
    let mut client = connect(proxy.addr("parked")).await;
    round_trip(&mut client, b"ping").await;
    proxy.wait_parked(1).await;
    let flood = pattern(16 << 20, 7);
    let (mut read, mut write) = client.into_split();
    let sent = {
        let flood = flood.clone();
        tokio::spawn(async move {
            write_chunked(&mut write, &flood)
                .await
                .expect("client floods");
            write.shutdown().await.expect("client FIN");
        })
    };
    let (len, hash) = within("the flood echoed", read_to_end_hashed(&mut read))
        .await
        .expect("client reads the echo");
    sent.await.expect("the flood's writer");
    assert_eq!((len, hash), (flood.len(), sha256(&flood)), "the echo");
    assert!(
        proxy.stats().ebpf.moves_to_kernel >= 1,
        "a taken-up connection never moved into the kernel"
    );
    proxy.expect_closed(Reason::Normal).await;
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_splice_whose_reader_falls_behind_is_taken_up() {
    if !ebpf_loads("a parked splice that passes bytes up") {
        return;
    }
    init_tracing();
    let go = Arc::new(Notify::new());
    let payload = Arc::new(pattern(8 << 20, 5));
    let backend = Backend::greeted_with(
        (Arc::clone(&go), Arc::clone(&payload)),
        |mut stream, (go, payload): (Arc<Notify>, Arc<Vec<u8>>)| async move {
            go.notified().await;
            write_chunked(&mut stream, &payload)
                .await
                .expect("backend sends");
            stream.shutdown().await.expect("backend FIN");
            expect_eof(&mut stream, "the backend reads to EOF").await;
        },
    )
    .await;
    // The smallest cap: the kernel passes the backend's bytes up soon after the client
    // stops reading, and only the splice's event can take the connection up for them.
    let proxy_lines = format!("{PARK_SOON}max_queued_bytes = 65536\n");
    let front = Frontend::Plain(DataPathMode::Ebpf);
    let (proxy, client) = Spliced::start(&front, &proxy_lines, backend).await;
    let mut client = client.into_tcp();
    proxy.wait_parked(1).await;
    go.notify_one();
    wait_for("the bytes passed up to take the connection up", || {
        proxy.stats().connections.parked == 0
    })
    .await;
    let (len, hash) = within("the backend's bytes", read_to_end_hashed(&mut client))
        .await
        .expect("client reads to EOF");
    assert_eq!(
        (len, hash),
        (payload.len(), sha256(&payload)),
        "what the client read"
    );
    client.shutdown().await.expect("client FIN");
    proxy
        .finish_closed(Reason::Normal, &[Direction::BackendToClient])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_left_the_kernel_parks_in_pass_mode() {
    if !ebpf_loads("parking in pass mode") {
        return;
    }
    init_tracing();
    let backend = Backend::spawn(echo).await;
    // A flood goes into the kernel, and the quiet after it takes the connection out to
    // pass mode (a move each).
    let config = format!("{PARK_SOON}{}", plain_route("pass", backend.addr, ""));
    let mut proxy = TestProxy::start_auto(AUTO_FLOOD_KNOBS, &config).await;
    let client = connect(proxy.addr("pass")).await;
    let mut client = echo_stream(client, &pattern(16 << 20, 11)).await;
    wait_for("the connection to leave the kernel and park", || {
        let stats = proxy.stats();
        stats.ebpf.moves_to_relay >= 1 && stats.connections.parked == 1
    })
    .await;
    assert!(
        proxy.stats().ebpf.moves_to_kernel >= 1,
        "the flood never went into the kernel"
    );

    // In pass mode the verdict hands every byte up: they take the connection up.
    round_trip(&mut client, b"ping").await;
    proxy.wait_parked(1).await;
    round_trip(&mut client, b"pong").await;
    client.shutdown().await.expect("client FIN");
    expect_eof(&mut client, "the client reads to EOF").await;
    proxy.expect_closed(Reason::Normal).await;
    backend.join().await;
    proxy.stop().await;
}

/// A connection that traffic takes up soon after it went quiet parks later each time
/// (`PARK_PAYS_AFTER`, `smartproxy/src/park/mod.rs`), until its task outlives the quiet
/// between two heartbeats: with heartbeats every [`HEARTBEAT_EVERY`] and parking after
/// 200 ms, its park delay goes 200 ms, 400 ms, 800 ms, 1.6 s, and from then on it keeps
/// its task; it still parks once the heartbeats stop. On the relay, and on `auto` with its
/// default knobs (heartbeats stay on the relay); on `ebpf` the kernel moves the heartbeats
/// and the connection stays parked throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_heartbeats_stops_parking_between_them() {
    for_each_data_path(|mode| async move {
        if mode == DataPathMode::Ebpf {
            let front = Frontend::Plain(mode);
            let backend = Backend::greeted(echo).await;
            let (proxy, mut client) = Spliced::start(&front, PARK_SOON, backend).await;
            heartbeats(&proxy, &mut client, true).await;
            for direction in Direction::BOTH {
                proxy.assert_kernel_moved(direction);
            }
            proxy.client_closes(&mut client).await;
            return;
        }
        let backend = Backend::spawn(echo).await;
        let config = format!("{PARK_SOON}{}", plain_route("beats", backend.addr, ""));
        let mut proxy = match mode {
            DataPathMode::Auto => TestProxy::start_auto("", &config).await,
            _ => TestProxy::start(mode, &config).await,
        };
        let mut client = connect(proxy.addr("beats")).await;
        round_trip(&mut client, b"open").await;
        heartbeats(&proxy, &mut client, false).await;
        assert_eq!(
            proxy.kernel_bytes(),
            [0, 0],
            "the heartbeats went through the kernel"
        );
        close_normally(&mut proxy, client).await;
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

/// Heartbeats on the proxy's one connection, parked at first, looking before each whether
/// it is parked; then waits until it parks once they stopped.
async fn heartbeats(
    proxy: &TestProxy,
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    spliced: bool,
) {
    proxy.wait_parked(1).await;
    for beat in 0..8 {
        tokio::time::sleep(HEARTBEAT_EVERY - HEARTBEAT_LOOK_BEFORE).await;
        let parked = proxy.stats().connections.parked;
        match beat {
            _ if spliced => assert_eq!(parked, 1, "heartbeat {beat}: a splice was taken up"),
            // Delays of 200 and 400 ms: parked well before the look.
            0 | 1 => assert_eq!(parked, 1, "heartbeat {beat}: not parked"),
            // 800 ms ends about when the test looks: the heartbeat may find it awake, and
            // the next one then takes it up at 800 ms. From the fifth on it is 1.6 s.
            2 | 3 => {}
            _ => assert_eq!(parked, 0, "heartbeat {beat}: parked between heartbeats"),
        }
        tokio::time::sleep(HEARTBEAT_LOOK_BEFORE).await;
        round_trip(client, b"beat").await;
    }
    proxy.wait_parked(1).await;
    round_trip(client, b"last").await;
}

/// The heartbeats' period in [`a_connection_with_heartbeats_stops_parking_between_them`].
const HEARTBEAT_EVERY: Duration = Duration::from_millis(1000);

/// How long before a heartbeat the test looks whether the connection is parked: a park
/// delay of 400 ms and a sweep (every 100 ms with a delay of 200 ms) end well before, and
/// one of 1.6 s well after.
const HEARTBEAT_LOOK_BEFORE: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_times_out_on_time() {
    init_tracing();
    let backend = Backend::spawn(echo).await;
    let config = format!(
        "{PARK_SOON}[lifecycle]\ninactivity_timeout = \"3s\"\ntimeout_behavior = \"close\"\n\n{}",
        plain_route("parked", backend.addr, "")
    );
    let mut proxy = TestProxy::start(DataPathMode::Userspace, &config).await;
    let mut client = connect(proxy.addr("parked")).await;
    // The proxy's last activity falls between these two.
    let before_ping = Instant::now();
    round_trip(&mut client, b"ping").await;
    let after_ping = Instant::now();
    proxy.wait_parked(1).await;
    expect_eof(&mut client, "the client reads to EOF").await;
    let (most, least) = (before_ping.elapsed(), after_ping.elapsed());
    assert!(
        most >= Duration::from_secs(3) && least < Duration::from_secs(5),
        "EOF {least:?} to {most:?} after the last byte, for an inactivity_timeout of 3 s"
    );
    drop(client);
    proxy.expect_closed(Reason::InactivityTimeout).await;
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_takes_parked_connections_up_and_drains_them() {
    init_tracing();
    // The drain ends with a reset of connections that did not close.
    let backend = Backend::spawn(|stream| async move {
        let _ = try_echo(stream).await;
    })
    .await;
    let config = format!(
        "[lifecycle]\ngrace_period = \"1s\"\n\n{}",
        plain_route("parked", backend.addr, "")
    );
    let mut proxy = TestProxy::start(DataPathMode::Userspace, &config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = connect(proxy.addr("parked")).await;
        round_trip(&mut client, b"ping").await;
        clients.push(client);
    }
    proxy.wait_parked(3).await;
    let metrics = smartproxy::metrics::render(&proxy.stats());
    assert!(
        metrics.contains("\nsmartproxy_connections_parked 3\n"),
        "the parked gauge:\n{metrics}"
    );
    proxy.proxy.shutdown();
    for _ in 0..3 {
        proxy.expect_closed(Reason::Shutdown).await;
    }
    // Stops in time once its parked connections closed.
    proxy.stop().await;
    drop(clients);
    backend.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_idle_after_zero_keeps_every_task_until_a_reload_turns_it_on() {
    init_tracing();
    let backend = Backend::spawn(echo).await;
    let route = plain_route("kept", backend.addr, "");
    let mut proxy = TestProxy::start(
        DataPathMode::Userspace,
        &format!("park_idle_after = \"0s\"\n\n{route}"),
    )
    .await;
    let mut client = connect(proxy.addr("kept")).await;
    round_trip(&mut client, b"ping").await;
    tokio::time::sleep(PARKED_BY_DEFAULT).await;
    assert_eq!(
        proxy.stats().connections.parked,
        0,
        "parked with parking off"
    );

    proxy.rewrite_config(&format!("{PARK_SOON}{route}"));
    proxy.proxy.reload().await.expect("the reload");
    proxy.wait_parked(1).await;
    round_trip(&mut client, b"pong").await;
    close_normally(&mut proxy, client).await;
    backend.join().await;
    proxy.stop().await;
}
