//! The `smartproxy` binary as an operator uses it: exit codes, messages, the control
//! socket. Every test runs the real executable (`CARGO_BIN_EXE_smartproxy`).
//!
//! Covers:
//! - `check` exits 0 for a valid file, and 2 for an invalid one with a message naming the
//!   file and the key: bad duration, unknown key, route without targets, bad listen
//!   address, unknown `data_path`, a TLS key that does not match its certificate, two
//!   plain routes on one listen address, missing file;
//! - `run` exits 1, naming the address, when the listen address or the metrics address is
//!   already in use;
//! - `run` on a valid config: the control socket is mode 0600; with one live connection
//!   through the proxy, `stats --json` has every contract key (every closure reason,
//!   zeros included), `stats` prints the route, `connections --json` lists the
//!   connection; `stats --control /nonexistent/...` exits 1 naming the path; SIGTERM
//!   makes the proxy exit 0 and remove its control socket;
//! - `connections --sort bytes|age|idle` puts the largest first, the default is by id,
//!   and `--route NAME` keeps that route's connections only;
//! - `stats --watch` prints a frame per second (from the second on with rates, active
//!   and half-open by data path, and the top routes) until SIGINT, on which it exits 0;
//!   the proxy itself exits 0 on SIGINT;
//! - `generate` writes the man pages and the bash, zsh and fish completions.
//!
//! Readiness is "the control socket accepts a connection": the proxy binds it after its
//! listeners, with SIGTERM/SIGINT/SIGHUP held back until their handlers run. Every wait
//! is a bounded poll.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::*;

/// The closure reasons (docs/architecture.md#closure-reasons), each a `closed` key.
const REASONS: [&str; 13] = [
    "normal",
    "client_reset",
    "backend_reset",
    "connect_failed",
    "connect_timeout",
    "handshake_timeout",
    "bad_handshake",
    "no_route",
    "inactivity_timeout",
    "parity_check",
    "denied",
    "max_connections",
    "shutdown",
];

/// The numeric keys of `smartproxy stats --json` (docs/architecture.md#stats), `closed.*`
/// aside.
const STATS_NUMBERS: [&str; 14] = [
    "uptime_secs",
    "connections.active",
    "connections.half_open",
    "connections.total",
    "connections.ebpf",
    "connections.userspace",
    "bytes.client_to_backend",
    "bytes.backend_to_client",
    "ebpf.sockhash_entries",
    "ebpf.events",
    "ebpf.events_lost",
    "ebpf.splice_failures",
    "ebpf.map_full",
    "ebpf.max_connections",
];

/// The keys of each `routes[]` entry besides `name`.
const ROUTE_NUMBERS: [&str; 4] = [
    "active",
    "total",
    "bytes_client_to_backend",
    "bytes_backend_to_client",
];

fn smartproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smartproxy"))
}

/// Runs a command that must end by itself, within [`WAIT`].
fn run_bounded(command: &mut Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the smartproxy binary starts");
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(WAIT) {
        Ok(output) => output.expect("the command's output is readable"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet
            // (its waiting thread is still blocked in wait).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{command:?} still running after {WAIT:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// === check ===

/// Writes `config` to a temporary file and runs `smartproxy check` on it.
fn check(config: &str) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("smartproxy.toml");
    std::fs::write(&path, config).expect("write the config");
    let output = run_bounded(smartproxy().arg("check").arg("--config").arg(&path));
    (output, path, dir)
}

const ROUTE: &str =
    "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\ntargets = [\"127.0.0.1:9000\"]\n";

#[test]
fn check_exits_0_for_a_valid_file() {
    let (output, path, _dir) = check(&format!(
        "[proxy]\ndata_path = \"userspace\"\n[lifecycle]\ngrace_period = \"5s\"\n{ROUTE}"
    ));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains(&path.display().to_string()),
        "stdout names the file: {}",
        text(&output.stdout)
    );
}

#[test]
fn check_exits_2_naming_file_and_key_for_each_invalid_file() {
    // (what is wrong, the file, the key its message must name, a word of the reason)
    let cases = [
        (
            "bad duration",
            format!("[lifecycle]\ngrace_period = \"soon\"\n{ROUTE}"),
            "lifecycle.grace_period",
            "invalid duration",
        ),
        (
            "unknown key",
            format!("[proxy]\ncolour = \"blue\"\n{ROUTE}"),
            "proxy.colour",
            "unknown key",
        ),
        (
            "route without targets",
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\ntargets = []\n".to_owned(),
            "route[0].targets",
            "at least one target",
        ),
        (
            "route with no targets key",
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8080\"\n".to_owned(),
            "route[0].targets",
            "missing",
        ),
        (
            "bad listen address",
            "[[route]]\nname = \"r\"\nlisten = \"localhost:8080\"\ntargets = [\"127.0.0.1:9000\"]\n"
                .to_owned(),
            "route[0].listen",
            "socket address",
        ),
        (
            "unknown data_path",
            format!("[proxy]\ndata_path = \"kernel\"\n{ROUTE}"),
            "proxy.data_path",
            "kernel",
        ),
        (
            "a private key that does not match its certificate",
            format!(
                "{ROUTE}tls = \"terminate\"\ncert = \"{certs}/cert.pem\"\nkey = \"{certs}/other-key.pem\"\n",
                certs = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/config/certs"),
            ),
            "route[0].key",
            "other-key.pem: the private key does not match the certificate",
        ),
        (
            "two plain routes on one listen address",
            format!("{ROUTE}{}", ROUTE.replace("\"r\"", "\"s\"")),
            "].listen",
            "127.0.0.1:8080",
        ),
    ];
    let mut failures = Vec::new();
    for (what, config, key, reason) in &cases {
        let (output, path, _dir) = check(config);
        let stderr = text(&output.stderr);
        let file = path.display().to_string();
        if output.status.code() != Some(2)
            || !stderr.contains(&file)
            || !stderr.contains(key)
            || !stderr.contains(reason)
        {
            failures.push(format!(
                "{what}: want exit 2 and stderr naming {file}, {key:?} and {reason:?}; \
                 got {} and stderr {stderr:?}",
                output.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_exits_2_naming_a_missing_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("absent.toml");
    let output = run_bounded(smartproxy().arg("check").arg("--config").arg(&path));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

// === run ===

/// Runs the proxy with a port already in use as its `metrics` address (`metrics = true`) or
/// as its route's `listen` address, and checks that it exits 1 naming that address.
fn assert_run_exits_1_naming_the_taken_address(metrics: bool) {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let addr = taken.local_addr().expect("occupied address");
    let (metrics_addr, listen) = if metrics {
        (addr, free_port())
    } else {
        (free_port(), addr)
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("smartproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\ndata_path = \"userspace\"\ncontrol_socket = {:?}\n\
             metrics = \"{metrics_addr}\"\n\
             [[route]]\nname = \"r\"\nlisten = \"{listen}\"\ntargets = [\"127.0.0.1:9\"]\n",
            dir.path().join("control.sock").display().to_string()
        ),
    )
    .expect("write the config");
    let output = run_bounded(smartproxy().arg("run").arg("--config").arg(&config));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&addr.to_string()),
        "stderr names {addr}: {stderr}"
    );
    drop(taken);
}

#[test]
fn run_exits_1_naming_a_listen_address_in_use() {
    assert_run_exits_1_naming_the_taken_address(false);
}

#[test]
fn run_exits_1_naming_a_metrics_address_in_use() {
    assert_run_exits_1_naming_the_taken_address(true);
}

/// The value at a dotted path of a JSON document.
fn at<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |value, key| value.get(key))
}

fn stats_json(control: &Path) -> Value {
    let output = run_bounded(
        smartproxy()
            .args(["stats", "--json", "--control"])
            .arg(control),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "stats --json: {}",
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stats --json is not JSON ({e}): {}", text(&output.stdout)))
}

#[test]
fn run_answers_stats_and_connections_then_exits_0_on_sigterm() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("echo-route", backend, "grace_period = \"1s\"");

    let mode = std::fs::metadata(&proxy.control)
        .expect("the control socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    // One live connection, carrying bytes both ways.
    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client.write_all(b"hello").expect("send to the proxy");
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).expect("the echo comes back");
    assert_eq!(&echoed, b"hello");

    let stats = stats_json(&proxy.control);
    assert_eq!(
        at(&stats, "data_path").and_then(Value::as_str),
        Some("userspace"),
        "{stats:#}"
    );
    for key in STATS_NUMBERS {
        assert!(
            at(&stats, key).is_some_and(Value::is_u64),
            "stats --json lacks the number {key}: {stats:#}"
        );
    }
    for reason in REASONS {
        // Nothing has closed yet: every reason is there, as a zero.
        assert_eq!(
            at(&stats, "closed").and_then(|c| c.get(reason)),
            Some(&Value::from(0)),
            "closed.{reason}: {stats:#}"
        );
    }
    assert_eq!(at(&stats, "connections.active"), Some(&Value::from(1)));
    assert_eq!(at(&stats, "connections.userspace"), Some(&Value::from(1)));
    for key in ["bytes.client_to_backend", "bytes.backend_to_client"] {
        assert_eq!(at(&stats, key), Some(&Value::from(5)), "{key}: {stats:#}");
    }
    let routes = at(&stats, "routes")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("stats --json lacks routes[]: {stats:#}"));
    assert_eq!(routes.len(), 1, "{stats:#}");
    let route = &routes[0];
    assert_eq!(route.get("name"), Some(&Value::from("echo-route")));
    for key in ROUTE_NUMBERS {
        assert!(
            route.get(key).is_some_and(Value::is_u64),
            "routes[0] lacks the number {key}: {stats:#}"
        );
    }
    assert_eq!(route.get("active"), Some(&Value::from(1)), "{stats:#}");

    let table = run_bounded(
        smartproxy()
            .args(["stats", "--control"])
            .arg(&proxy.control),
    );
    assert_eq!(table.status.code(), Some(0), "{}", text(&table.stderr));
    assert!(
        text(&table.stdout).contains("echo-route"),
        "the stats table names the route: {}",
        text(&table.stdout)
    );

    let listed = run_bounded(
        smartproxy()
            .args(["connections", "--json", "--control"])
            .arg(&proxy.control),
    );
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed.stderr));
    let rows: Value = serde_json::from_slice(&listed.stdout).unwrap_or_else(|e| {
        panic!(
            "connections --json is not JSON ({e}): {}",
            text(&listed.stdout)
        )
    });
    let rows = rows.as_array().expect("connections --json is an array");
    assert_eq!(rows.len(), 1, "one live connection: {rows:#?}");
    let client_addr = client.local_addr().expect("client address").to_string();
    assert_eq!(rows[0].get("client"), Some(&Value::from(client_addr)));
    assert_eq!(rows[0].get("route"), Some(&Value::from("echo-route")));

    // The connection ends normally (FIN both ways) before the proxy is stopped.
    client.shutdown(Shutdown::Write).expect("send FIN");
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .expect("the proxy passes the FIN back");
    assert!(rest.is_empty());

    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        !proxy.control.exists(),
        "the control socket {} is removed on exit",
        proxy.control.display()
    );
}

/// Sends `message` on `client` and reads its echo.
fn round_trip(client: &mut TcpStream, message: &[u8]) {
    client.write_all(message).expect("send to the proxy");
    let mut echoed = vec![0u8; message.len()];
    client.read_exact(&mut echoed).expect("the echo comes back");
}

/// The `id`s `smartproxy connections --json ARGS` lists, in its order.
fn listed_ids(control: &Path, args: &[&str]) -> Vec<u64> {
    let output = run_bounded(
        smartproxy()
            .args(["connections", "--json", "--control"])
            .arg(control)
            .args(args),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let rows: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&output.stdout)));
    rows.as_array()
        .expect("an array")
        .iter()
        .map(|row| row.get("id").and_then(Value::as_u64).expect("an id"))
        .collect()
}

#[test]
fn connections_sort_by_bytes_age_idle_and_filter_by_route() {
    let backend = echo_backend();
    let proxy = ProxyProcess::start("sorted", backend, "");
    // `older` is accepted first and moves few bytes; `newer` moves many; then `older`
    // is the last to carry a byte, so `newer` has been idle longer.
    let mut older = TcpStream::connect(proxy.listen).expect("connect older");
    older.set_read_timeout(Some(WAIT)).expect("read timeout");
    round_trip(&mut older, b"a");
    let mut newer = TcpStream::connect(proxy.listen).expect("connect newer");
    newer.set_read_timeout(Some(WAIT)).expect("read timeout");
    round_trip(&mut newer, &[b'b'; 100_000]);
    round_trip(&mut older, b"a");

    let by_id = listed_ids(&proxy.control, &[]);
    assert_eq!(by_id.len(), 2, "two live connections: {by_id:?}");
    let (first, second) = (by_id[0], by_id[1]);
    assert!(first < second, "default order is by id: {by_id:?}");
    assert_eq!(
        listed_ids(&proxy.control, &["--sort", "bytes"]),
        [second, first]
    );
    assert_eq!(
        listed_ids(&proxy.control, &["--sort", "age"]),
        [first, second]
    );
    assert_eq!(
        listed_ids(&proxy.control, &["--sort", "idle"]),
        [second, first]
    );
    assert_eq!(
        listed_ids(&proxy.control, &["--route", "sorted", "--sort", "id"]),
        [first, second]
    );
    assert!(listed_ids(&proxy.control, &["--route", "other"]).is_empty());
    let table = run_bounded(
        smartproxy()
            .args(["connections", "--sort", "bytes", "--control"])
            .arg(&proxy.control),
    );
    assert_eq!(table.status.code(), Some(0), "{}", text(&table.stderr));
    assert_eq!(
        text(&table.stdout).lines().count(),
        3,
        "a header and two rows: {}",
        text(&table.stdout)
    );
}

#[test]
fn stats_exits_1_naming_a_control_socket_that_is_absent() {
    let path = "/nonexistent/smartproxy/control.sock";
    let output = run_bounded(smartproxy().args(["stats", "--control", path]));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(path), "stderr names {path}: {stderr}");
}

/// What `stats --watch` writes before every frame: clear the screen, home the cursor.
const CLEAR_SCREEN: &str = "\x1b[2J";

#[test]
fn stats_watch_prints_frames_until_sigint_and_the_proxy_exits_0_on_sigint() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("watched", backend, "grace_period = \"1s\"");

    let mut watch = smartproxy()
        .args(["stats", "--watch", "--control"])
        .arg(&proxy.control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("stats --watch starts");
    let mut stdout = watch.stdout.take().expect("piped stdout");
    let (chunks, received) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if chunks.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let watch_pid = watch.id() as libc::pid_t;
    // Kills the watcher if an assertion below fails.
    let watch_guard = KillOnDrop(watch);

    let mut seen = String::new();
    let deadline = Instant::now() + WAIT;
    while seen.matches(CLEAR_SCREEN).count() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&text(&chunk)),
            Err(_) => panic!("fewer than two frames after {WAIT:?}: {seen:?}"),
        }
    }
    let frames: Vec<&str> = seen.split(CLEAR_SCREEN).skip(1).collect();
    assert!(
        frames[0].contains("watched"),
        "a frame names the route: {:?}",
        frames[0]
    );
    for part in [
        "conn/s",
        "B/s",
        "top routes",
        "ebpf      active",
        "userspace active",
    ] {
        assert!(
            frames[1].contains(part),
            "the second frame shows {part:?}: {:?}",
            frames[1]
        );
    }

    // SAFETY: kill(2) on our own child, not yet reaped (the guard holds its `Child`).
    assert_eq!(unsafe { libc::kill(watch_pid, libc::SIGINT) }, 0);
    let mut watch = watch_guard;
    let deadline = Instant::now() + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = watch.0.try_wait().expect("try_wait on stats --watch") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "stats --watch still runs 3s after SIGINT"
        );
        std::thread::sleep(POLL);
    };
    assert_eq!(
        status.code(),
        Some(0),
        "stats --watch exits 0 on SIGINT, not {status}"
    );
    while let Ok(chunk) = received.recv_timeout(WAIT) {
        seen.push_str(&text(&chunk));
    }
    assert!(
        seen.ends_with('\n'),
        "stats --watch ends on a whole frame: {:?}",
        seen.get(seen.len().saturating_sub(200)..)
    );

    proxy.signal(libc::SIGINT);
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}");
    assert!(!proxy.control.exists(), "control socket removed on exit");
}

/// Kills and reaps a child when dropped, if it still runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// === reload ===

/// Rewrites the proxy's config file with its one route now pointing at `target`, after
/// `[proxy]` lines `proxy_extra`.
fn retarget(proxy: &ProxyProcess, target: SocketAddr, proxy_extra: &str) {
    let text = format!(
        "[proxy]\ndata_path = \"userspace\"\ncontrol_socket = {control:?}\n{proxy_extra}\n\n\
         [[route]]\nname = \"web\"\nlisten = \"{listen}\"\ntargets = [\"{target}\"]\n",
        control = proxy.control.display().to_string(),
        listen = proxy.listen,
    );
    std::fs::write(proxy.config_file(), text).expect("rewrite the config");
}

#[test]
fn sighup_and_the_reload_command_apply_a_new_config_and_refuse_a_bad_one() {
    let (a, b, c) = (
        tagged_backend(b'A'),
        tagged_backend(b'B'),
        tagged_backend(b'C'),
    );
    let proxy = ProxyProcess::start("web", a, "");
    assert_eq!(tag_of(proxy.listen), b'A');
    let mut live = std::net::TcpStream::connect(proxy.listen).expect("a live connection");
    live.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut tag = [0u8];
    live.read_exact(&mut tag).expect("its backend's tag");

    // SIGHUP: new connections go to B once the proxy re-read the file.
    retarget(&proxy, b, "");
    proxy.signal(libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while tag_of(proxy.listen) != b'B' {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new targets"
        );
        std::thread::sleep(POLL);
    }
    assert!(proxy.log().contains("configuration reloaded (SIGHUP)"));

    // `smartproxy reload` with a bad file: exit 1, the reason on stderr, B still serves.
    std::fs::write(proxy.config_file(), "[proxy\n").expect("write a broken config");
    let output = run_bounded(
        smartproxy()
            .arg("reload")
            .arg("--control")
            .arg(&proxy.control),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("reload refused") && stderr.contains("smartproxy.toml"),
        "stderr names the refusal and the file: {stderr}"
    );
    assert_eq!(tag_of(proxy.listen), b'B');
    assert!(proxy.log().contains("reload refused"));

    // A restart-only key: refused the same way.
    retarget(&proxy, c, "max_queued_bytes = 1048576");
    let output = run_bounded(
        smartproxy()
            .arg("reload")
            .arg("--control")
            .arg(&proxy.control),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("proxy.max_queued_bytes"));

    // A good file: exit 0, what changed on stdout, C serves.
    retarget(&proxy, c, "");
    let output = run_bounded(
        smartproxy()
            .arg("reload")
            .arg("--control")
            .arg(&proxy.control),
    );
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim(),
        "reloaded: routes added: none; removed: none; changed: web"
    );
    assert_eq!(tag_of(proxy.listen), b'C');

    // The connection from before every reload still carries bytes.
    live.write_all(b"still here")
        .expect("write on the live connection");
    let mut echoed = [0u8; 10];
    live.read_exact(&mut echoed).expect("its echo");
    assert_eq!(&echoed, b"still here");
}

/// `generate` (hidden; used by `cargo xtask dist`) writes a man page per visible command
/// and each shell's completions, all from the one clap definition: every subcommand an
/// operator can type is in them, and the hidden `generate` is not.
#[test]
fn generate_writes_man_pages_and_completions_for_every_visible_command() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let generate = |args: &[&str]| {
        let out = run_bounded(smartproxy().arg("generate").args(args).arg(dir.path()));
        assert!(
            out.status.success(),
            "generate {args:?}: {}",
            text(&out.stderr)
        );
    };
    generate(&["man"]);
    for shell in ["bash", "zsh", "fish"] {
        generate(&["completions", shell]);
    }
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let top = read("smartproxy.1");
    for command in ["run", "check", "stats", "connections", "reload"] {
        assert!(top.contains(command), "smartproxy.1 lists {command}");
        assert!(
            read(&format!("smartproxy-{command}.1")).contains("config"),
            "smartproxy-{command}.1 documents its options (each has --config)"
        );
        for script in ["smartproxy.bash", "_smartproxy", "smartproxy.fish"] {
            assert!(
                read(script).contains(command),
                "{script} completes {command}"
            );
        }
    }
    assert!(
        !top.contains("generate"),
        "the hidden command stays out of the man page"
    );
    assert!(!dir.path().join("smartproxy-generate.1").exists());
}
