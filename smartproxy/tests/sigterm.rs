//! SIGTERM against the real `smartproxy` binary (DESIGN.md: "stop accepting at once, let
//! connections finish, close the rest after `grace_period`, exit 0").
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
//!   exits 0.
//!
//! The transfer is held "in progress" deterministically: the client sends half, the test
//! signals the proxy and waits for the refusal, and only then the client sends the rest.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Bounds every wait: reaching it is a failure, not the wait itself.
const WAIT: Duration = Duration::from_secs(10);
/// How often a bounded wait looks again.
const POLL: Duration = Duration::from_millis(20);

const TRANSFER: usize = 8 << 20;
const CHUNK: usize = 64 << 10;

/// A loopback port nobody listens on right now (bound, read, released).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A loopback backend that echoes every connection until EOF, then closes its side.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo backend");
    let addr = listener.local_addr().expect("echo backend address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone the echo stream");
                let mut writer = stream;
                if std::io::copy(&mut reader, &mut writer).is_ok() {
                    let _ = writer.shutdown(Shutdown::Write);
                }
            });
        }
    });
    addr
}

// === the proxy process ===

/// A `smartproxy run` child. Dropping it kills the process if it still runs, and prints
/// its log when the test is failing.
struct ProxyProcess {
    child: Child,
    log: PathBuf,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `smartproxy run` with one plain route on a free loopback port to `backend`
    /// (userspace data path, control socket in a temporary directory) and the given
    /// `grace_period`, and waits until its control socket answers: the proxy binds it
    /// after its listeners and after installing its signal handlers.
    fn start(backend: SocketAddr, grace_period: &str) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let control = dir.path().join("control.sock");
        let listen = free_port();
        let config = dir.path().join("smartproxy.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\ndata_path = \"userspace\"\ncontrol_socket = {control:?}\n\n\
                 [lifecycle]\ngrace_period = \"{grace_period}\"\n\n\
                 [[route]]\nname = \"echo\"\nlisten = \"{listen}\"\ntargets = [\"{backend}\"]\n",
                control = control.display().to_string(),
            ),
        )
        .expect("write the config");
        let log = dir.path().join("proxy.log");
        let out = std::fs::File::create(&log).expect("create the proxy log");
        let err = out.try_clone().expect("clone the proxy log handle");
        let child = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("the smartproxy binary starts");
        let mut proxy = ProxyProcess {
            child,
            log,
            listen,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while UnixStream::connect(&control).is_err() {
            if let Some(status) = proxy.child.try_wait().expect("try_wait on the proxy") {
                panic!("the proxy exited before it was ready: {status}");
            }
            assert!(Instant::now() < deadline, "proxy not ready after {WAIT:?}");
            std::thread::sleep(POLL);
        }
        proxy
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (we hold `Child`).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill({}, SIGTERM)", self.child.id());
    }

    /// Waits for the process to exit by itself within `within`.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on the proxy") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy still runs {within:?} later"
            );
            std::thread::sleep(POLL);
        }
    }

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

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- proxy log ({}):\n{log}", self.log.display());
        }
    }
}

// === scenarios ===

#[test]
fn transfer_in_progress_at_sigterm_completes_while_new_connects_are_refused() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start(backend, "5s");

    let mut data = vec![0u8; TRANSFER];
    rand::thread_rng().fill_bytes(&mut data);
    let sent_digest = Sha256::digest(&data);

    let client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.set_write_timeout(Some(WAIT)).expect("write timeout");

    // Reads the echo to EOF, concurrently with the writes (the echo must not stall).
    let mut reader = client.try_clone().expect("clone the client stream");
    let echoed = std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut total = 0usize;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok((total, hasher.finalize())),
                Ok(n) => {
                    total += n;
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
    proxy.sigterm();
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
    let mut proxy = ProxyProcess::start(backend, "500ms");

    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.write_all(b"ping").expect("send to the proxy");
    let mut echoed = [0u8; 4];
    client
        .read_exact(&mut echoed)
        .expect("the connection is relayed");
    assert_eq!(&echoed, b"ping");

    let signalled = Instant::now();
    proxy.sigterm();
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
