//! Timeouts and half-open policy, on each data path (`inactivity_timeout = "300ms"` and
//! friends, so that each case takes a few seconds at most); the inactivity, parity and
//! `allow_half_open` cases also over TLS the proxy terminates:
//! - `timeout_behavior = "reset"`: an idle connection outlives ten inactivity timeouts
//!   (3 s), each one counted, and still relays both ways;
//! - `timeout_behavior = "ignore"`: an idle connection outlives 3 s and still relays;
//! - `timeout_behavior = "close"`: an idle connection ends (the client sees EOF) within
//!   2 s, reason `inactivity_timeout`;
//! - parity check: a half-closed connection where nothing moves is closed with
//!   `parity_check`; one whose open direction keeps sending is left alone; one whose
//!   finishing direction never drains (the backend never reads 2 MiB sent before the
//!   client's FIN) is closed with `parity_check` too;
//! - `allow_half_open = false`: the client's FIN ends the connection; the client still
//!   gets the bytes the proxy had taken, then EOF; the backend sees EOF; `normal`;
//! - connect: a target that never answers SYN gives `connect_timeout`; a refused target
//!   is skipped for the next one; all targets refused gives `connect_failed` at once;
//!   a name that resolves to nothing (`nonexistent.invalid`) is skipped like a refused
//!   target, and when every target fails the client gets a clean close (FIN, no byte).
//!
//! Each lifecycle case first makes a round trip ([`TestProxy::established`]), so that the
//! kernel variant runs spliced, and the kernel variant checks the kernel moved the bytes
//! sent after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// The correctness bound on a 300 ms timeout: far above it, far below `WAIT`.
const PROMPTLY: Duration = Duration::from_secs(2);

fn inactivity(behavior: &str) -> String {
    format!("[lifecycle]\ninactivity_timeout = \"300ms\"\ntimeout_behavior = \"{behavior}\"\n\n")
}

/// Ends a connection to an [`echo`] backend cleanly: FIN, then EOF back.
async fn finish(mut client: impl AsyncRead + AsyncWrite + Unpin) {
    client.shutdown().await.expect("client FIN");
    expect_eof(&mut client, "the client reads to EOF").await;
}

// === inactivity_timeout ===

/// Ends a case whose idle connection must outlive its idle time: nothing closed, the
/// connection still active and relaying both ways (through the kernel on its path), then
/// a normal close.
async fn survived(mut proxy: Spliced, mut client: Client) {
    proxy.assert_nothing_closed();
    assert_eq!(proxy.stats().connections.active, 1, "active after 3 s idle");
    round_trip(&mut client, b"after").await;
    finish(client).await;
    proxy
        .finish_closed(
            Reason::Normal,
            &[Direction::ClientToBackend, Direction::BackendToClient],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_reset_counts_each_timeout_and_never_closes() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(echo).await;
        let (proxy, client) = Spliced::start(&front, &inactivity("reset"), backend).await;
        // Ten counted timeouts of 300 ms: the connection sat idle for 3 s.
        wait_for("ten inactivity resets", || {
            proxy.stats().lifecycle.inactivity_resets >= 10
        })
        .await;
        survived(proxy, client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_ignore_keeps_an_idle_connection_relaying() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(echo).await;
        let (proxy, client) = Spliced::start(&front, &inactivity("ignore"), backend).await;
        // The idle period is the scenario itself: nothing happens that could be awaited.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            proxy.stats().lifecycle.inactivity_resets,
            0,
            "no timer under ignore"
        );
        survived(proxy, client).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_close_ends_an_idle_connection_with_eof() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(echo).await;
        let (proxy, mut client) = Spliced::start(&front, &inactivity("close"), backend).await;
        let idle_since = Instant::now();
        let mut rest = Vec::new();
        within(
            "the idle connection is closed",
            client.read_to_end(&mut rest),
        )
        .await
        .expect("a graceful close: EOF, not RST");
        let idle = idle_since.elapsed();
        assert!(
            rest.is_empty(),
            "{} unexpected bytes before EOF",
            rest.len()
        );
        assert!(
            idle < PROMPTLY,
            "a 300 ms inactivity timeout closed after {idle:?}"
        );
        drop(client);
        proxy.finish_closed(Reason::InactivityTimeout, &[]).await;
    })
    .await;
}

// === parity check ===

/// Parity check after 300 ms, no inactivity timer, and `extra` lifecycle lines.
fn parity(extra: &str) -> String {
    format!(
        "[lifecycle]\nparity_check_timeout = \"300ms\"\nparity_inactivity = \"300ms\"\n\
         timeout_behavior = \"ignore\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_check_closes_a_half_closed_connection_where_nothing_moves() {
    for_each_frontend(|front| async move {
        // The backend keeps its side open until the client saw the proxy close it.
        let release = Arc::new(Notify::new());
        let backend =
            Backend::greeted_with(Arc::clone(&release), |mut stream, release| async move {
                read_request(&mut stream, b"request").await;
                release.notified().await;
            })
            .await;
        let (proxy, mut client) = Spliced::start(&front, &parity(""), backend).await;
        client.write_all(b"request").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        expect_eof(&mut client, "the parity check closes the connection").await;
        release.notify_one();
        proxy
            .finish_closed(Reason::ParityCheck, &[Direction::ClientToBackend])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_check_spares_a_half_closed_connection_that_keeps_sending() {
    const TICKS: usize = 20;
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(|mut stream| async move {
            let mut request = Vec::new();
            stream
                .read_to_end(&mut request)
                .await
                .expect("backend reads up to the client's FIN");
            send_ticks(&mut stream, TICKS, Duration::from_millis(100)).await;
            // Returning closes the stream: a FIN behind the last tick.
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, &parity(""), backend).await;
        client.write_all(b"subscribe").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        for index in 0..TICKS {
            read_tick(&mut client, index).await;
        }
        expect_eof(&mut client, "the client reads to the backend's FIN").await;
        proxy
            .finish_closed(Reason::Normal, &[Direction::BackendToClient])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_check_closes_a_connection_whose_finishing_direction_never_drains() {
    // What the client sends before its FIN: more than the backend's receive buffer, so
    // that bytes stay queued toward it, and little enough that the proxy takes it all and
    // reads the FIN on both paths (the rule counts from that EOF; a FIN behind bytes the
    // proxy cannot take is never read).
    const QUEUED: usize = 2 * 1024 * 1024;
    for_each_data_path(|mode| async move {
        // The backend neither reads nor sends, until the test is over.
        let release = Arc::new(Notify::new());
        let backend = Backend::greeted_with(Arc::clone(&release), |stream, release| async move {
            release.notified().await;
            drop(stream);
        })
        .await;
        // A short grace period: the backend never answers the close with its FIN.
        let (mut proxy, client) = Spliced::start(
            &Frontend::Plain(mode),
            &parity("grace_period = \"300ms\""),
            backend,
        )
        .await;
        let mut client = client.into_tcp();
        within(
            "the proxy takes the bytes",
            write_chunked(&mut client, &pattern(QUEUED, 31)),
        )
        .await
        .expect("client writes");
        client.shutdown().await.expect("client FIN");
        expect_eof(&mut client, "the parity check closes the connection").await;
        proxy.expect_closed(Reason::ParityCheck).await;
        proxy.assert_kernel_moved(Direction::ClientToBackend);
        release.notify_one();
        proxy.finish().await;
    })
    .await;
}

// === allow_half_open = false ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_half_open_client_fin_delivers_taken_bytes_then_eof_both_ways() {
    const BANNER: usize = 64 * 1024;
    for_each_frontend(|front| async move {
        let banner = pattern(BANNER, 21);
        let expected = sha256(&banner);
        // The backend stays open until the client got its EOF: that EOF must come from
        // the proxy's policy, not from the backend closing.
        let release = Arc::new(Notify::new());
        let state = (Arc::clone(&release), banner);
        let backend = Backend::greeted_with(state, |mut stream, (release, banner)| async move {
            let mut ask = [0u8; 3];
            stream.read_exact(&mut ask).await.expect("backend reads");
            stream.write_all(&banner).await.expect("backend writes");
            read_request(&mut stream, b"bye").await;
            release.notified().await;
        })
        .await;
        let (proxy, mut client) =
            Spliced::start(&front, "[lifecycle]\nallow_half_open = false\n", backend).await;
        client.write_all(b"ask").await.expect("client writes");
        // The FIN goes out once the proxy has taken every banner byte (the client has
        // read none yet).
        let banner_done = (GREETING.len() + BANNER) as u64;
        wait_for("the proxy takes the banner", || {
            proxy.stats().bytes.backend_to_client == banner_done
        })
        .await;
        client.write_all(b"bye").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        let (len, hash) = within("the client reads to EOF", read_to_end_hashed(&mut client))
            .await
            .expect("a graceful close: EOF, not RST");
        assert_eq!(len, BANNER, "banner bytes at the client");
        assert_eq!(hash, expected, "banner checksum at the client");
        release.notify_one();
        proxy
            .finish_closed(Reason::Normal, &[Direction::BackendToClient])
            .await;
    })
    .await;
}

// === connect ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_that_never_answers_closes_with_connect_timeout() {
    for_each_data_path(|mode| async move {
        let silent = tokio::task::spawn_blocking(SilentTarget::bind)
            .await
            .expect("a silent target");
        let route = plain_route("silent", silent.addr, "connect_timeout = \"300ms\"");
        let mut proxy = TestProxy::start(mode, &route).await;
        let mut client = connect(proxy.addr("silent")).await;
        let started = Instant::now();
        expect_hangup(&mut client).await;
        let waited = started.elapsed();
        assert!(
            waited < PROMPTLY,
            "a 300 ms connect timeout took {waited:?}"
        );
        proxy.expect_closed(Reason::ConnectTimeout).await;
        proxy.stop().await;
    })
    .await;
}

/// A shutdown reaches a connection still waiting for its backend (the stop stage's nudge,
/// `smartproxy/src/nudge.rs`): it ends at once, not at its connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_a_connection_still_connecting_at_once() {
    for_each_data_path(|mode| async move {
        let silent = tokio::task::spawn_blocking(SilentTarget::bind)
            .await
            .expect("a silent target");
        let route = plain_route("silent", silent.addr, "connect_timeout = \"60s\"");
        let mut proxy = TestProxy::start(mode, &route).await;
        let mut client = connect(proxy.addr("silent")).await;
        wait_for("the connection is in setup", || {
            proxy.proxy.connection_rows().len() == 1
        })
        .await;
        let started = Instant::now();
        proxy.proxy.shutdown();
        expect_hangup(&mut client).await;
        let waited = started.elapsed();
        assert!(waited < PROMPTLY, "the shutdown took {waited:?}");
        proxy.expect_closed(Reason::Shutdown).await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_is_skipped_for_the_next_one() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let route = plain_route_to("fallback", &[refused_addrs(1)[0], backend.addr], "");
        let mut proxy = TestProxy::start(mode, &route).await;
        // Round-robin starts each connection at another target: both orders are served.
        for attempt in 0..2 {
            let mut client = connect(proxy.addr("fallback")).await;
            round_trip(&mut client, format!("attempt {attempt}").as_bytes()).await;
            finish(client).await;
            proxy.expect_closed(Reason::Normal).await;
        }
        assert_eq!(
            proxy.stats().closed(Reason::ConnectFailed),
            0,
            "connect_failed"
        );
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_refused_closes_with_connect_failed_at_once() {
    for_each_data_path(|mode| async move {
        let route = plain_route_to("nowhere", &refused_addrs(2), "");
        let mut proxy = TestProxy::start(mode, &route).await;
        let mut client = connect(proxy.addr("nowhere")).await;
        let started = Instant::now();
        expect_hangup(&mut client).await;
        let waited = started.elapsed();
        assert!(
            waited < PROMPTLY,
            "refused targets took {waited:?} to give up on"
        );
        proxy.expect_closed(Reason::ConnectFailed).await;
        proxy.stop().await;
    })
    .await;
}

/// A route to `targets` written as text (names as well as addresses).
fn route_to_names(name: &str, targets: &[String]) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntargets = [{}]\n",
        targets.join(", ")
    )
}

/// `.invalid` never resolves (RFC 6761); the test proxy's resolver answers it at once
/// without a query.
const UNRESOLVABLE: &str = "nonexistent.invalid:80";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_target_is_skipped_for_the_next_one() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let targets = [
            UNRESOLVABLE.to_owned(),
            refused_addrs(1)[0].to_string(),
            backend.addr.to_string(),
        ];
        let mut proxy = TestProxy::start(mode, &route_to_names("fallback", &targets)).await;
        // Round-robin starts each connection at another target: every order is served.
        for attempt in 0..3 {
            let mut client = connect(proxy.addr("fallback")).await;
            round_trip(&mut client, format!("attempt {attempt}").as_bytes()).await;
            finish(client).await;
            proxy.expect_closed(Reason::Normal).await;
        }
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_failing_gives_a_clean_close() {
    for_each_data_path(|mode| async move {
        let targets = [UNRESOLVABLE.to_owned(), refused_addrs(1)[0].to_string()];
        let mut proxy = TestProxy::start(mode, &route_to_names("nowhere", &targets)).await;
        for _ in 0..2 {
            let mut client = connect(proxy.addr("nowhere")).await;
            let mut rest = Vec::new();
            let read = within("the proxy closes", client.read_to_end(&mut rest)).await;
            assert!(
                matches!(read, Ok(0)),
                "expected a clean close (FIN, no byte), got {read:?} and {} bytes",
                rest.len()
            );
            proxy.expect_closed(Reason::ConnectFailed).await;
        }
        proxy.stop().await;
    })
    .await;
}
