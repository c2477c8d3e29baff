//! Resets through the proxy, over plain TCP on each data path and over TLS the proxy
//! terminates (an RST is an RST, whatever ran over the connection):
//! - the client resets: the backend sees ECONNRESET, reason `client_reset`;
//! - the backend resets: the client sees ECONNRESET, reason `backend_reset`;
//! - after the client's FIN the backend resets: the client, still reading, sees the
//!   reset; reason `backend_reset`;
//! - after the client's FIN the client resets: the backend, which already read that
//!   FIN, sees the reset; reason `client_reset`;
//! - the backend answers (1 byte to 4 KiB) and resets at once, 50 times: the client gets
//!   the whole answer, then the reset; the mirror, where the client sends and resets,
//!   and the backend must get the bytes, then the reset.
//!
//! Each connection first makes a round trip ([`TestProxy::established`]), so that the
//! kernel variant runs spliced, and the kernel variant checks the kernel moved the bytes
//! sent after it.

use std::sync::Arc;

use smartproxy::config::DataPathMode;
use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_backend() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(|mut stream| async move {
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await.expect("backend reads");
            stream.write_all(b"ready").await.expect("backend writes");
            expect_reset(&mut stream).await;
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"hello").await.expect("client writes");
        let mut ready = [0u8; 5];
        within("the backend answers", client.read_exact(&mut ready))
            .await
            .expect("client reads");
        client.reset();
        proxy
            .finish_closed(
                Reason::ClientReset,
                &[Direction::ClientToBackend, Direction::BackendToClient],
            )
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_resets_the_client() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(|mut stream| async move {
            let mut hello = [0u8; 5];
            stream.read_exact(&mut hello).await.expect("backend reads");
            reset(stream);
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"hello").await.expect("client writes");
        expect_reset(&mut client).await;
        proxy
            .finish_closed(Reason::BackendReset, &[Direction::ClientToBackend])
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_after_client_fin_resets_the_client() {
    for_each_frontend(|front| async move {
        let backend = Backend::greeted(|mut stream| async move {
            read_request(&mut stream, b"hello").await;
            reset(stream);
        })
        .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"hello").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        expect_reset(&mut client).await;
        proxy
            .finish_closed(Reason::BackendReset, &[Direction::ClientToBackend])
            .await;
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
            Backend::greeted_with(Arc::clone(&fin_seen), |mut stream, fin_seen| async move {
                read_request(&mut stream, b"hello").await;
                fin_seen.notify_one();
                expect_reset_after_eof(&stream).await;
            })
            .await;
        let (proxy, mut client) = Spliced::start(&front, "", backend).await;
        client.write_all(b"hello").await.expect("client writes");
        client.shutdown().await.expect("client FIN");
        within("the backend reads the client's FIN", fin_seen.notified()).await;
        client.reset();
        proxy
            .finish_closed(Reason::ClientReset, &[Direction::ClientToBackend])
            .await;
    })
    .await;
}

// === bytes right before an RST ===

/// Connections per data path: the kernel path lost the race in about half of them.
const BEFORE_RESET_ROUNDS: usize = 50;

/// The sizes of the last bytes before the RST, by round.
fn size_of_round(round: usize) -> usize {
    [1, 100, 1460, 4096][round % 4]
}

/// Reads until the stream ends: the bytes, and how it ended (`Ok` for an RST).
async fn read_until_reset(stream: &mut TcpStream) -> (Vec<u8>, Result<(), String>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match within("the reset", stream.read(&mut buf)).await {
            Ok(0) => return (got, Err("EOF (FIN) instead of the reset".to_owned())),
            Ok(read) => got.extend_from_slice(&buf[..read]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, Ok(())),
            Err(e) => return (got, Err(format!("error {e} instead of the reset"))),
        }
    }
}

/// Whether a stream delivered `expected`, then an RST (see [`read_until_reset`]).
fn check_before_reset(
    expected: &[u8],
    (got, end): (Vec<u8>, Result<(), String>),
) -> Result<(), String> {
    if got != expected {
        let intact = got.iter().zip(expected).take_while(|(a, b)| a == b).count();
        let end = end.err().unwrap_or_else(|| "the reset".to_owned());
        return Err(format!(
            "{} of {} bytes ({intact} intact), then {end}",
            got.len(),
            expected.len()
        ));
    }
    end
}

/// Waits until the peer's TCP has acknowledged every byte written to `stream`: they left
/// this socket, and an abort now discards none of them.
async fn wait_sent(stream: &TcpStream) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    wait_for("the bytes are acknowledged", || {
        let mut unsent: libc::c_int = 0;
        // SAFETY: `fd` is an open socket for the duration of the call; TIOCOUTQ writes
        // one int.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unsent) };
        rc == 0 && unsent == 0
    })
    .await;
}

/// One round's connection ([`TestProxy::established`]); adds the kernel bytes of its
/// greeting to `greetings`, so that what remains of the kernel's count is the rounds' own
/// bytes (not every round's are the kernel's: it passes some to the relay).
async fn established_round(
    proxy: &TestProxy,
    front: &Frontend,
    greetings: &mut [u64; 2],
) -> TcpStream {
    let before = proxy.kernel_bytes();
    let client = proxy.established(front, "rst").await.into_tcp();
    for (total, (after, before)) in greetings
        .iter_mut()
        .zip(proxy.kernel_bytes().into_iter().zip(before))
    {
        *total += after - before;
    }
    client
}

/// Runs [`BEFORE_RESET_ROUNDS`] rounds through a proxy on `mode` to `backend`, each on a
/// connection of its own ([`established_round`]) that `round` drives, given the round's
/// byte count, and that must close with `reason`. Fails the test with every round that
/// went wrong (`what` they test), so that one run tells how often; then checks that the
/// kernel moved the rounds' bytes in `direction`.
async fn run_rounds(
    mode: DataPathMode,
    backend: Backend,
    (reason, direction): (Reason, Direction),
    what: &str,
    mut round: impl AsyncFnMut(TcpStream, usize) -> Result<(), String>,
) {
    let mut proxy = TestProxy::start(mode, &plain_route("rst", backend.addr, "")).await;
    let front = Frontend::Plain(mode);
    let mut greetings = proxy.kernel_bytes();
    let mut failures = Vec::new();
    for index in 0..BEFORE_RESET_ROUNDS {
        let len = size_of_round(index);
        let client = established_round(&proxy, &front, &mut greetings).await;
        if let Err(why) = round(client, len).await {
            failures.push(format!("round {index}, {why}"));
        }
        let closed = proxy.next_closed().await;
        if closed.reason != reason {
            failures.push(format!("round {index}: closed {}", closed.reason));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {BEFORE_RESET_ROUNDS} rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    proxy.assert_kernel_moved(greetings, direction);
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_answer_right_before_its_reset_reaches_the_client_first() {
    for_each_data_path(|mode| async move {
        let backend = Backend::greeted(|mut stream| async move {
            let mut request = [0u8; 4];
            stream
                .read_exact(&mut request)
                .await
                .expect("backend reads");
            let len = u32::from_le_bytes(request) as usize;
            stream
                .write_all(&pattern(len, len as u64))
                .await
                .expect("backend answers");
            reset(stream);
        })
        .await;
        let closes = (Reason::BackendReset, Direction::BackendToClient);
        let what = "the backend's answer, then its reset";
        run_rounds(mode, backend, closes, what, async |mut client, len| {
            client
                .write_all(&(len as u32).to_le_bytes())
                .await
                .expect("client writes");
            let outcome = read_until_reset(&mut client).await;
            check_before_reset(&pattern(len, len as u64), outcome)
                .map_err(|what| format!("a {len}-byte answer: {what}"))
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_bytes_right_before_its_reset_reach_the_backend_first() {
    for_each_data_path(|mode| async move {
        let (outcomes, mut results) = tokio::sync::mpsc::unbounded_channel();
        let backend = Backend::greeted_with(outcomes, |mut stream, outcomes| async move {
            let outcome = read_until_reset(&mut stream).await;
            outcomes
                .send(outcome)
                .expect("the test waits for every outcome");
        })
        .await;
        let closes = (Reason::ClientReset, Direction::ClientToBackend);
        let what = "the client's bytes, then its reset";
        run_rounds(mode, backend, closes, what, async |mut client, len| {
            let sent = pattern(len, len as u64);
            client.write_all(&sent).await.expect("client writes");
            wait_sent(&client).await;
            reset(client);
            let outcome = within("the backend's outcome", results.recv())
                .await
                .expect("a backend outcome");
            check_before_reset(&sent, outcome).map_err(|what| format!("{len} bytes: {what}"))
        })
        .await;
    })
    .await;
}
