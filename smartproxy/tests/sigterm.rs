//! SIGTERM against the real `smartproxy` binary (docs/architecture.md#shutdown: stop
//! accepting at once, let connections finish, cut the rest after `grace_period`, exit 0).
//!
//! Its own test binary because it raises real signals (at a child process) and times a
//! shutdown; nothing else runs beside it.
//!
//! Covers:
//! - a transfer in progress when SIGTERM arrives: new connects are refused
//!   (ECONNREFUSED) while it is still in progress, it then completes intact (length and
//!   SHA-256 of 8 MiB echoed back) within `grace_period = "5s"`, and the proxy exits 0 by
//!   itself once it ended;
//! - an idle connection still open when `grace_period = "500ms"` runs out is closed by
//!   the proxy (the client sees EOF or RST, not before the grace period), and the proxy
//!   exits 0;
//! - on both data paths, during the drain the control socket (`smartproxy stats`) and the
//!   metrics endpoint still answer and show the live connection; a second SIGTERM ends
//!   the drain at once: the proxy exits 0 long before `grace_period = "60s"`, and both the
//!   client and the backend see their connection reset.
//!
//! The transfer is held "in progress" deterministically: the client sends half, the test
//! signals the proxy and waits for the refusal, and only then the client sends the rest.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod support;
use support::*;

const TRANSFER: usize = 8 << 20;
const CHUNK: usize = 64 << 10;

// === the proxy process ===

impl ProxyProcess {
    /// Polls new connects until one is refused; panics on any other outcome after
    /// [`WAIT`]. Connects that still succeed (the listener not closed yet) are dropped.
    fn wait_refused(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match TcpStream::connect_timeout(&self.listen, WAIT) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
                Err(e) => panic!("connect to {} failed, but not refused: {e}", self.listen),
                Ok(stream) => drop(stream),
            }
            assert!(
                Instant::now() < deadline,
                "{} still accepts {WAIT:?} after SIGTERM",
                self.listen
            );
            std::thread::sleep(POLL);
        }
    }
}

// === scenarios ===

#[test]
fn transfer_in_progress_at_sigterm_completes_while_new_connects_are_refused() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("echo", backend, "grace_period = \"5s\"");

    let data = pattern(TRANSFER, 1);
    let sent_digest = Sha256::digest(&data);

    let client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.set_write_timeout(Some(WAIT)).expect("write timeout");

    // Reads the echo to EOF, concurrently with the writes (the echo must not stall).
    let mut reader = client.try_clone().expect("clone the client stream");
    let echoed_so_far = Arc::new(AtomicUsize::new(0));
    let progress = Arc::clone(&echoed_so_far);
    let echoed = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut total = 0usize;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok((total, hasher.finalize())),
                Ok(n) => {
                    total += n;
                    progress.store(total, Ordering::Relaxed);
                    hasher.update(&buf[..n]);
                }
                Err(e) => return Err(format!("after {total} echoed bytes: {e}")),
            }
        }
    });

    // Sends the first half, reports it, waits for the go-ahead, sends the rest, then FIN.
    let (half_sent, on_half_sent) = mpsc::channel();
    let (go, on_go) = mpsc::channel::<()>();
    let mut writer = client;
    let written = std::thread::spawn(move || -> Result<(), String> {
        let (first, second) = data.split_at(TRANSFER / 2);
        for chunk in first.chunks(CHUNK) {
            writer
                .write_all(chunk)
                .map_err(|e| format!("first half: {e}"))?;
        }
        let _ = half_sent.send(());
        on_go
            .recv_timeout(WAIT)
            .map_err(|_| "no go-ahead for the second half".to_owned())?;
        for chunk in second.chunks(CHUNK) {
            writer
                .write_all(chunk)
                .map_err(|e| format!("second half: {e}"))?;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("FIN: {e}"))
    });

    on_half_sent
        .recv_timeout(WAIT)
        .expect("the first half is sent through the proxy");
    // Written is not relayed: under load the whole first half can wait in the socket
    // buffers of a connection the proxy has not accepted yet, which the closing listener
    // then resets. The transfer is in progress once echoed bytes come back.
    let deadline = Instant::now() + WAIT;
    while echoed_so_far.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no echoed byte within {WAIT:?}");
        std::thread::sleep(POLL);
    }
    proxy.signal(libc::SIGTERM);
    proxy.wait_refused();
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy must wait for the transfer in progress, not exit"
    );
    go.send(()).expect("the writer waits for the go-ahead");

    written
        .join()
        .expect("the writer thread does not panic")
        .expect("the whole 8 MiB is sent after SIGTERM");
    let (total, digest) = echoed
        .join()
        .expect("the reader thread does not panic")
        .expect("the echo arrives to EOF");
    assert_eq!(total, TRANSFER, "echoed byte count");
    assert_eq!(digest, sent_digest, "the echoed bytes are the bytes sent");

    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

#[test]
fn idle_connection_is_closed_after_grace_period_and_the_proxy_exits_0() {
    let backend = echo_backend();
    let grace = Duration::from_millis(500);
    let mut proxy = ProxyProcess::start("echo", backend, "grace_period = \"500ms\"");

    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.write_all(b"ping").expect("send to the proxy");
    let mut echoed = [0u8; 4];
    client
        .read_exact(&mut echoed)
        .expect("the connection is relayed");
    assert_eq!(&echoed, b"ping");

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    // The connection stays open and idle: the proxy has to close it.
    let mut byte = [0u8; 1];
    match client.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{n} unexpected bytes instead of a close"),
        Err(e) => panic!("no EOF or RST from the proxy within {WAIT:?}: {e}"),
    }
    let closed_after = signalled.elapsed();
    assert!(
        closed_after >= grace,
        "closed {closed_after:?} after SIGTERM, before the grace period of {grace:?}"
    );

    let status = proxy.wait_exit(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
}

/// A backend for one connection: echoes until its read ends, then reports how it ended
/// (`Ok(())` for EOF, else the error's kind).
fn reporting_echo_backend() -> (SocketAddr, mpsc::Receiver<Result<(), ErrorKind>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let addr = listener.local_addr().expect("backend address");
    let (report, reports) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the proxy connects");
        let mut buf = [0u8; 4096];
        let outcome = loop {
            match stream.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = stream.write_all(&buf[..n]) {
                        break Err(e.kind());
                    }
                }
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = report.send(outcome);
    });
    (addr, reports)
}

#[test]
fn the_drain_can_be_watched_and_a_second_sigterm_cuts_it_short() {
    for data_path in data_paths() {
        eprintln!("--- data path: {data_path}");
        let (backend, backend_end) = reporting_echo_backend();
        let metrics = free_port();
        let mut proxy = ProxyProcess::start_with(
            "echo",
            backend,
            "grace_period = \"60s\"",
            &format!("{}\nmetrics = \"{metrics}\"", data_path_lines(data_path)),
        );
        let booked = booked_path(data_path);
        let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
        echo_once(&mut client, b"before the drain");
        let stats = proxy.stats();
        assert_eq!(stats["connections"][booked], 1, "{stats}");
        if splices(data_path) {
            assert_eq!(stats["ebpf"]["sockhash_entries"], 2, "spliced: {stats}");
        }

        proxy.signal(libc::SIGTERM);
        wait_until("the drain begins", || proxy.log().contains("shutting down"));
        let stats = proxy.stats();
        assert_eq!(
            stats["connections"]["active"], 1,
            "during the drain: {stats}"
        );
        assert_eq!(stats["connections"][booked], 1, "during the drain: {stats}");
        let scraped = scrape(metrics);
        assert!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
        let active =
            format!("smartproxy_connections_active{{route=\"echo\",data_path=\"{booked}\"}} 1\n");
        assert!(scraped.contains(&active), "no {active:?} in {scraped}");
        echo_once(&mut client, b"during the drain");

        let signalled = Instant::now();
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(WAIT);
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after the cut: {status}"
        );
        assert!(
            proxy.log().contains("second signal"),
            "the cut is logged:\n{}",
            proxy.log()
        );
        eprintln!("exited {:?} after the second SIGTERM", signalled.elapsed());
        client.set_read_timeout(Some(WAIT)).expect("read timeout");
        let mut byte = [0u8; 1];
        match client.read(&mut byte) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("the client must see a reset, got {other:?}"),
        }
        let ended = backend_end
            .recv_timeout(WAIT)
            .expect("the backend's connection ends");
        assert_eq!(
            ended,
            Err(ErrorKind::ConnectionReset),
            "the backend sees a reset"
        );
    }
}
