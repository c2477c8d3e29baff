//! TLS the proxy terminates cannot move in an upgrade (its session state stays in the old
//! process): such a connection stays, keeps working in the old process, and is ended
//! there at `grace_period`, while the successor serves new TLS connections. A real
//! client: `openssl s_client`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/config/certs");

/// An `openssl s_client` session through the proxy, one line at a time.
struct TlsClient {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl TlsClient {
    fn connect(addr: std::net::SocketAddr) -> TlsClient {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-no_ign_eof", "-connect"])
            .arg(addr.to_string())
            .args(["-servername", "localhost", "-CAfile"])
            .arg(format!("{CERTS}/cert.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_client (cargo xtask test installs it)");
        let input = child.stdin.take().expect("its stdin");
        let output = BufReader::new(child.stdout.take().expect("its stdout"));
        TlsClient {
            child,
            input,
            output,
        }
    }

    /// Sends `line` and reads the echo; `None` once the session ended.
    fn echo(&mut self, line: &str) -> Option<String> {
        self.input.write_all(format!("{line}\n").as_bytes()).ok()?;
        self.input.flush().ok()?;
        let mut back = String::new();
        match self.output.read_line(&mut back) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(back.trim_end().to_owned()),
        }
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn terminated_tls_stays_in_the_old_process_and_drains_there() {
    let backend = echo_backend();
    let grace = Duration::from_secs(2);
    let mut proxy = ProxyProcess::start_configured(
        "tls",
        backend,
        &format!("grace_period = \"{}s\"", grace.as_secs()),
        USERSPACE,
        |_| {},
    );
    // The harness writes a plain route: make it terminate TLS.
    let config = std::fs::read_to_string(proxy.config_file()).expect("read the config");
    std::fs::write(
        proxy.config_file(),
        format!(
            "{config}tls = \"terminate\"\ncert = \"{CERTS}/cert.pem\"\nkey = \"{CERTS}/key.pem\"\n"
        ),
    )
    .expect("write the config");
    // Take the new route in: reload, then check a session works.
    let reload = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
        .args(["reload", "--control"])
        .arg(&proxy.control)
        .output()
        .expect("run smartproxy reload");
    assert!(reload.status.success(), "{reload:?}\n{}", proxy.log());
    let mut session = TlsClient::connect(proxy.listen);
    assert_eq!(
        session.echo("before").as_deref(),
        Some("before"),
        "{}",
        proxy.log()
    );

    let output = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
        .args(["upgrade", "--json", "--control"])
        .arg(&proxy.control)
        .output()
        .expect("run smartproxy upgrade");
    let reply: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("upgrade --json prints JSON");
    assert!(output.status.success(), "{reply}\n{}", proxy.log());
    let mut successors = Successors::new();
    successors.track(reply["new_pid"].as_i64().expect("new_pid") as libc::pid_t);
    assert_eq!(reply["moved"], 0, "{reply}");
    assert_eq!(reply["staying"], 1, "the TLS session stays: {reply}");
    let handed_over = Instant::now();

    // Still served, by the old process, until its grace period ends.
    assert_eq!(
        session.echo("after").as_deref(),
        Some("after"),
        "{}",
        proxy.log()
    );
    // New sessions go to the successor.
    let mut fresh = TlsClient::connect(proxy.listen);
    assert_eq!(fresh.echo("new").as_deref(), Some("new"), "{}", proxy.log());

    let status = proxy.wait_exit(grace + WAIT);
    assert!(status.success(), "the old process exits 0: {status}");
    assert!(
        handed_over.elapsed() >= grace - Duration::from_millis(200),
        "it drained for grace_period, not less: {:?}",
        handed_over.elapsed()
    );
    assert_eq!(session.echo("gone"), None, "the drained session ended");
    assert!(
        proxy.log().contains("reason=shutdown"),
        "closed at the end of the drain: {}",
        proxy.log()
    );
    assert_eq!(fresh.echo("still").as_deref(), Some("still"));
}
