//! `smartproxy upgrade` when it cannot or must not happen, and when it is cut short: a
//! successor whose configuration does not load, one that exits before it confirms, a
//! binary others can change, an upgrade during a drain or during another upgrade, and the
//! old process killed in the middle of the handoff; and the limits a successor keeps. Each failure leaves the running proxy
//! serving every connection it had and accepting new ones; each test runs on each data
//! path ([`data_paths`]: userspace, and ebpf and auto where the kernel path loads).
//!
//! A successor is started by the proxy, not by the test: it outlives the `ProxyProcess`
//! child. This test binary makes itself a child subreaper, so an orphaned successor
//! becomes its child, and [`Successors`] kills and reaps every successor a test saw.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Where the kernel-path proxies mount bpffs for their pins (one directory per control
/// socket below it, so the tests do not share pins).
const PIN_ROOT: &str = "/tmp/smartproxy-test-bpffs";

/// The `[proxy]` lines of a proxy on `data_path`: a kernel path pins its maps.
fn proxy_lines(data_path: &str) -> String {
    if splices(data_path) {
        format!(
            "{}\nebpf_pin_root = \"{PIN_ROOT}\"",
            data_path_lines(data_path)
        )
    } else {
        data_path_lines(data_path)
    }
}

/// The children of `parent`, from `/proc/*/stat`.
fn children_of(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After the name: state, ppid.
        let ppid = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

/// What `smartproxy upgrade --json` said and how it exited.
struct UpgradeRun {
    code: Option<i32>,
    reply: serde_json::Value,
    stderr: String,
}

impl UpgradeRun {
    fn ok(&self) -> bool {
        self.code == Some(0) && self.reply["ok"] == true
    }

    fn message(&self) -> String {
        self.reply["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// `new_pid` of a successful upgrade.
    fn new_pid(&self) -> libc::pid_t {
        let pid = self.reply["new_pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("no new_pid in {}", self.reply));
        pid as libc::pid_t
    }
}

/// `run` handed `moved` connections over and the old process exited 0: the successor's
/// pid, tracked by `pids`.
fn handed_over(
    run: &UpgradeRun,
    proxy: &mut ProxyProcess,
    pids: &mut Successors,
    moved: u64,
) -> libc::pid_t {
    assert!(run.ok(), "{} {}", run.reply, run.stderr);
    let successor = run.new_pid();
    pids.track(successor);
    assert_eq!(run.reply["moved"], moved, "{}", run.reply);
    assert_eq!(
        proxy.wait_exit(WAIT).code(),
        Some(0),
        "the old process exits"
    );
    successor
}

/// Starts `smartproxy upgrade --json --control CONTROL [--binary BINARY]`.
fn spawn_upgrade(control: &Path, binary: Option<&Path>) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_smartproxy"));
    command
        .args(["upgrade", "--json", "--control"])
        .arg(control)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(binary) = binary {
        command.arg("--binary").arg(binary);
    }
    command.spawn().expect("run smartproxy upgrade")
}

/// Waits (bounded) for a `smartproxy upgrade` to finish.
fn finish_upgrade(mut child: std::process::Child) -> UpgradeRun {
    let deadline = Instant::now() + Duration::from_secs(45);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smartproxy upgrade still runs after 45 s");
        }
        std::thread::sleep(POLL);
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let reply = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("upgrade --json prints JSON ({e}): stdout {stdout:?}, stderr {stderr:?}")
    });
    UpgradeRun {
        code: status.code(),
        reply,
        stderr,
    }
}

/// Waits (bounded) for a `smartproxy upgrade` whose proxy was killed: its exit code.
fn finish_upgrade_killed(mut child: std::process::Child) -> Option<i32> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smartproxy upgrade still runs after its proxy died");
        }
        std::thread::sleep(POLL);
    }
}

fn upgrade(control: &Path, binary: Option<&Path>) -> UpgradeRun {
    finish_upgrade(spawn_upgrade(control, binary))
}

/// Asserts a failed upgrade: exit 1, `ok: false`, a message that holds `expected`.
fn assert_refused(run: &UpgradeRun, expected: &str) {
    assert_eq!(
        run.code,
        Some(1),
        "the upgrade fails: {} {}",
        run.reply,
        run.stderr
    );
    assert_eq!(run.reply["ok"], false, "{}", run.reply);
    assert!(run.reply["new_pid"].is_null(), "{}", run.reply);
    assert!(
        run.message().contains(expected),
        "the message names the cause ({expected:?}): {:?}",
        run.message()
    );
}

/// `n` connections through the proxy at `listen`, each with one echo round trip done.
fn open_echo(listen: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut stream = TcpStream::connect(listen).expect("connect to the proxy");
            echo_once(&mut stream, format!("hello {i}").as_bytes());
            stream
        })
        .collect()
}

/// An echo round trip on every connection.
fn all_served(streams: &mut [TcpStream], round: &str) {
    for (i, stream) in streams.iter_mut().enumerate() {
        echo_once(stream, format!("{round} {i}").as_bytes());
    }
}

/// `smartproxy stats --json` of the proxy answering on `control`.
fn stats_of(control: &Path) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
        .args(["stats", "--json", "--control"])
        .arg(control)
        .output()
        .expect("run smartproxy stats");
    assert!(output.status.success(), "smartproxy stats: {output:?}");
    serde_json::from_slice(&output.stdout).expect("stats --json is JSON")
}

/// On the kernel paths, `n` connections are spliced (on auto, at their first read).
fn assert_spliced(data_path: &str, control: &Path, n: u64) {
    if splices(data_path) {
        let stats = stats_of(control);
        assert_eq!(stats["connections"]["ebpf"], n, "spliced: {stats}");
    }
}

/// The old process keeps everything: same pid, no child left, every connection served,
/// and a new connection accepted (and spliced on the kernel path).
fn assert_unchanged(
    proxy: &mut ProxyProcess,
    data_path: &str,
    streams: &mut [TcpStream],
    round: &str,
) {
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the old process still runs"
    );
    assert_eq!(
        children_of(proxy.pid()),
        Vec::<libc::pid_t>::new(),
        "no successor is left running"
    );
    all_served(streams, round);
    let mut fresh = open_echo(proxy.listen, 1);
    assert_spliced(data_path, &proxy.control, streams.len() as u64 + 1);
    all_served(&mut fresh, "fresh");
    drop(fresh);
}

/// A shell script `body` in a fresh 0755 directory, with `mode`.
fn script(body: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("successor.sh");
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

/// SIGTERM once the connections closed: the proxy stops cleanly (and removes its pins).
fn stop(mut proxy: ProxyProcess, streams: Vec<TcpStream>) {
    drop(streams);
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0), "a clean stop");
}

fn start(data_path: &str, backend: SocketAddr, lifecycle: &str) -> ProxyProcess {
    ProxyProcess::start_with("echo", backend, lifecycle, &proxy_lines(data_path))
}

#[test]
fn a_successor_whose_configuration_does_not_load_changes_nothing() {
    for data_path in data_paths() {
        let mut pids = Successors::new();
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"1s\"");
        let mut streams = open_echo(proxy.listen, 5);
        assert_spliced(data_path, &proxy.control, 5);

        let config = proxy.config_file();
        let good = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{good}\n[[route]\nname = \"broken\"\n")).unwrap();
        let run = upgrade(&proxy.control, None);
        assert_refused(&run, "the configuration does not load");
        assert!(
            run.message().contains("smartproxy.toml"),
            "names the file: {:?}",
            run.message()
        );
        assert_unchanged(&mut proxy, data_path, &mut streams, "after");

        // Fixed, the same upgrade goes through, and the successor serves them all.
        std::fs::write(&config, &good).unwrap();
        let run = upgrade(&proxy.control, None);
        let new_pid = handed_over(&run, &mut proxy, &mut pids, 5);
        all_served(&mut streams, "moved");
        assert_spliced(data_path, &proxy.control, 5);
        drop(streams);
        assert_eq!(
            pids.stop(new_pid, libc::SIGTERM),
            Some(0),
            "{data_path}: the successor stops cleanly"
        );
    }
}

#[test]
fn a_successor_that_exits_before_confirming_changes_nothing() {
    for data_path in data_paths() {
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"1s\"");
        let mut streams = open_echo(proxy.listen, 5);
        assert_spliced(data_path, &proxy.control, 5);

        let (_dir, binary) = script("#!/bin/sh\nexit 3\n", 0o755);
        let run = upgrade(&proxy.control, Some(&binary));
        assert_refused(&run, "exited");
        assert!(
            run.message().contains("exit status: 3"),
            "{data_path}: says how: {:?}",
            run.message()
        );
        assert_unchanged(&mut proxy, data_path, &mut streams, "after");
        assert!(
            proxy.log().contains("upgrade failed"),
            "the proxy logs the failure:\n{}",
            proxy.log()
        );
        stop(proxy, streams);
    }
}

#[test]
fn a_binary_others_can_change_is_refused() {
    for data_path in data_paths() {
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"1s\"");
        let mut streams = open_echo(proxy.listen, 3);

        let (_writable_dir, writable) = script("#!/bin/sh\nexit 0\n", 0o777);
        let run = upgrade(&proxy.control, Some(&writable));
        assert_refused(&run, "writable by its group or by others");
        assert!(
            run.message().contains(&*writable.to_string_lossy()),
            "names the binary: {:?}",
            run.message()
        );

        let (_foreign_dir, foreign) = script("#!/bin/sh\nexit 0\n", 0o755);
        std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
        let run = upgrade(&proxy.control, Some(&foreign));
        assert_refused(&run, "owned by uid 4242");

        assert_unchanged(&mut proxy, data_path, &mut streams, "after");
        assert!(
            !proxy.log().contains("successor started"),
            "no successor was started:\n{}",
            proxy.log()
        );
        stop(proxy, streams);
    }
}

#[test]
fn an_upgrade_during_a_drain_is_refused() {
    for data_path in data_paths() {
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"30s\"");
        let mut streams = open_echo(proxy.listen, 2);
        assert_spliced(data_path, &proxy.control, 2);
        proxy.signal(libc::SIGTERM);
        wait_until("the proxy drains", || proxy.log().contains("shutting down"));

        let run = upgrade(&proxy.control, None);
        assert_refused(&run, "shutting down");
        assert_eq!(children_of(proxy.pid()), Vec::<libc::pid_t>::new());
        // The drain goes on: the open connections are served until they end, then the
        // process exits.
        all_served(&mut streams, "draining");
        drop(streams);
        assert_eq!(proxy.wait_exit(WAIT).code(), Some(0), "{data_path}");
    }
}

#[test]
fn of_two_concurrent_upgrades_one_is_refused() {
    for data_path in data_paths() {
        let mut pids = Successors::new();
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"1s\"");
        let mut streams = open_echo(proxy.listen, 3);

        // Both requests reach the old process: the successor, which shares its control
        // socket once it runs, starts a second or more later.
        let (a, b) = (
            spawn_upgrade(&proxy.control, None),
            spawn_upgrade(&proxy.control, None),
        );
        let runs = [finish_upgrade(a), finish_upgrade(b)];
        let (won, lost): (Vec<_>, Vec<_>) = runs.iter().partition(|run| run.ok());
        for run in &won {
            pids.track(run.new_pid());
        }
        assert_eq!(
            (won.len(), lost.len()),
            (1, 1),
            "{data_path}: exactly one succeeds: {:?}",
            runs.iter().map(|r| r.reply.to_string()).collect::<Vec<_>>()
        );
        assert_refused(lost[0], "another upgrade is under way");
        assert_eq!(won[0].reply["old_pid"], proxy.pid());
        assert_eq!(won[0].reply["moved"], 3, "{}", won[0].reply);

        assert_eq!(
            proxy.wait_exit(WAIT).code(),
            Some(0),
            "the old process exits"
        );
        all_served(&mut streams, "moved");
        assert_spliced(data_path, &proxy.control, 3);
        drop(streams);
        let new_pid = won[0].new_pid();
        assert_eq!(pids.stop(new_pid, libc::SIGTERM), Some(0), "{data_path}");
    }
}

/// A successor shares the control socket from its start, so an upgrade request may reach
/// it while it still adopts connections: it refuses until it took over, then upgrades.
#[test]
fn a_successor_refuses_its_own_upgrade_until_it_took_over() {
    const TAKING_OVER: &str = "still taking over from its predecessor";
    const UNDER_WAY: &str = "another upgrade is under way";
    for data_path in data_paths() {
        let mut pids = Successors::new();
        let backend = echo_backend();
        // The successor is taking over until the silent connection ends.
        let (mut proxy, held) = start_held(data_path, backend, "30s");
        let mut streams = open_echo(proxy.listen, 3);
        let silent = TcpStream::connect(held).expect("connect to the held listener");
        let accepted = Instant::now();
        let request = upgrade_held(&proxy, 4, false).expect("the command runs");
        // Both processes accept on the control socket: ask until the successor answers,
        // well before the silent connection's handshake times out.
        let ready = Instant::now();
        let until = (ready + Duration::from_secs(10)).min(accepted + Duration::from_secs(25));
        let mut answers = Vec::new();
        while Instant::now() < until && !answers.iter().any(|a: &String| a.contains(TAKING_OVER)) {
            let run = upgrade(&proxy.control, None);
            assert_refused(&run, "");
            answers.push(run.message());
        }
        eprintln!(
            "{data_path}: {} asked, {:?} after the successor was ready",
            answers.len(),
            ready.elapsed()
        );
        // Its handshake ends, and with it the handoff.
        drop(silent);
        assert!(
            answers.iter().any(|a| a.contains(TAKING_OVER)),
            "{data_path}: the successor refused while taking over: {answers:?}"
        );
        assert!(
            answers
                .iter()
                .all(|a| a.contains(TAKING_OVER) || a.contains(UNDER_WAY)),
            "{data_path}: {answers:?}"
        );

        let successor = handed_over(&finish_upgrade(request), &mut proxy, &mut pids, 3);
        all_served(&mut streams, "moved");

        // Once it took over, it upgrades like any proxy.
        let second = upgrade(&proxy.control, None);
        assert!(second.ok(), "{data_path}: {}", second.reply);
        assert_eq!(second.reply["old_pid"], successor, "{}", second.reply);
        pids.track(second.new_pid());
        assert_eq!(
            pids.wait_exit(successor),
            0,
            "{data_path}: the first successor exits"
        );
        all_served(&mut streams, "moved again");
        assert_spliced(data_path, &proxy.control, 3);
        drop(streams);
        assert_eq!(
            pids.stop(second.new_pid(), libc::SIGTERM),
            Some(0),
            "{data_path}: the second successor stops cleanly"
        );
    }
}

/// A proxy with a second listener that requires a PROXY header: a connection to it that
/// never sends one holds an upgrade's handoff open until `handshake_timeout` ends it.
/// Returns the proxy and that listener's address.
fn start_held(
    data_path: &str,
    backend: SocketAddr,
    handshake_timeout: &str,
) -> (ProxyProcess, SocketAddr) {
    let held = free_port();
    let routes = format!(
        "[[route]]\nname = \"held\"\nlisten = \"{held}\"\ntargets = [\"{backend}\"]\n\
         accept_proxy_protocol = \"v1\"\nproxy_protocol_trusted = [\"127.0.0.1\"]\n"
    );
    let proxy = ProxyProcess::start_routes(
        "echo",
        backend,
        &format!("grace_period = \"5s\"\nhandshake_timeout = \"{handshake_timeout}\""),
        &proxy_lines(data_path),
        &routes,
        |_| {},
    );
    (proxy, held)
}

/// Once `active` connections are open (one of them silent on the held listener), starts
/// an upgrade (`smartproxy upgrade`, or SIGUSR2 `by_signal`) and returns once the
/// successor is ready and the handoff began: with the command, which still runs.
fn upgrade_held(proxy: &ProxyProcess, active: u64, by_signal: bool) -> Option<std::process::Child> {
    wait_until("the proxy accepted every connection", || {
        stats_of(&proxy.control)["connections"]["active"] == active
    });
    let request = if by_signal {
        proxy.signal(libc::SIGUSR2);
        None
    } else {
        Some(spawn_upgrade(&proxy.control, None))
    };
    wait_until("the successor is ready", || {
        proxy.log().contains("successor ready, handing over")
    });
    request
}

/// SIGTERM to the old process while it hands over, the upgrade asked for on the control
/// socket or by SIGUSR2: the upgrade completes, and the successor drains too, so the
/// service stops as asked and no connection is cut.
#[test]
fn a_stop_during_the_handoff_reaches_the_successor() {
    for data_path in data_paths() {
        for by_signal in [false, true] {
            let how = if by_signal {
                "SIGUSR2"
            } else {
                "control socket"
            };
            let mut pids = Successors::new();
            let backend = echo_backend();
            let (mut proxy, held) = start_held(data_path, backend, "6s");
            let mut streams = open_echo(proxy.listen, 3);
            let silent = TcpStream::connect(held).expect("connect to the held listener");
            let request = upgrade_held(&proxy, 4, by_signal);

            proxy.signal(libc::SIGTERM);
            assert_eq!(
                proxy.wait_exit(WAIT).code(),
                Some(0),
                "the old process exits"
            );
            let successor = match request {
                Some(request) => {
                    let run = finish_upgrade(request);
                    assert!(run.ok(), "{data_path}: {}", run.reply);
                    assert_eq!(run.reply["moved"], 3, "{}", run.reply);
                    run.new_pid()
                }
                None => successor_pid(&proxy.log()).expect("the successor's pid in the log"),
            };
            pids.track(successor);
            assert!(
                proxy.log().contains("passed on to the successor"),
                "{data_path}, {how}: the old process says so"
            );
            all_served(&mut streams, "draining in the successor");
            wait_until("no process accepts any more", || {
                TcpStream::connect(proxy.listen).is_err()
            });
            drop((streams, silent));
            assert_eq!(
                pids.wait_exit(successor),
                0,
                "{data_path}, {how}: the successor drains and exits"
            );
        }
    }
}

/// Connections admitted before an upgrade count against the successor's limits: a client
/// at its cap stays at it, and a full route stays full.
#[test]
fn moved_connections_count_against_the_successors_limits() {
    for data_path in data_paths() {
        let mut pids = Successors::new();
        let backend = echo_backend();
        let capped = free_port();
        let routes = format!(
            "[[route]]\nname = \"capped\"\nlisten = \"{capped}\"\ntargets = [\"{backend}\"]\n\
             max_connections = 2\n"
        );
        let mut proxy = ProxyProcess::start_routes(
            "echo",
            backend,
            "grace_period = \"1s\"",
            &format!("{}\nmax_connections_per_ip = 3", proxy_lines(data_path)),
            &routes,
            |_| {},
        );
        let mut at_cap = open_echo(capped, 2);
        let mut other = open_echo(proxy.listen, 1);

        let successor = handed_over(&upgrade(&proxy.control, None), &mut proxy, &mut pids, 3);

        // A connection to `addr` is refused, by `limit`.
        let refused_by = |addr: SocketAddr, limit: &str| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            assert_closed(&mut stream, data_path, limit);
            let stats = stats_of(&proxy.control);
            assert_eq!(stats["refused"][limit], 1, "{data_path}: {stats}");
        };
        // Closes one of `streams`: `active` are left.
        let close_one = |streams: &mut Vec<TcpStream>, active: u64| {
            drop(streams.pop());
            wait_until("the successor closed the dropped connection", || {
                stats_of(&proxy.control)["connections"]["active"] == active
            });
        };
        refused_by(proxy.listen, "max_connections_per_ip");
        close_one(&mut other, 2);
        refused_by(capped, "route_max_connections");
        close_one(&mut at_cap, 1);
        all_served(&mut open_echo(capped, 1), "once a slot is free");
        all_served(&mut at_cap, "moved");
        drop(at_cap);
        assert_eq!(
            pids.stop(successor, libc::SIGTERM),
            Some(0),
            "{data_path}: the successor stops cleanly"
        );
    }
}

/// `stream`, just connected, is refused (by `what`): the proxy closes it without an
/// echo.
fn assert_closed(stream: &mut TcpStream, data_path: &str, what: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    let _ = stream.write_all(b"refused?");
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{data_path}: refused by {what}, not {other:?}"),
    }
}

/// How the successor's `took over from the predecessor` line counts: (connections,
/// complete).
fn taken_over(log: &str, predecessor: libc::pid_t) -> Option<(u64, bool)> {
    let line = log.lines().find(|line| {
        line.contains("took over from the predecessor")
            && line.contains(&format!("predecessor={predecessor} "))
    })?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(key))
            .map(|v| v.trim_matches(|c: char| !c.is_alphanumeric()).to_owned())
    };
    Some((
        field("connections=")?.parse().ok()?,
        field("complete=")? == "true",
    ))
}

#[test]
fn sigkill_of_the_old_process_during_the_handoff_loses_no_taken_connection() {
    const N: usize = 500;
    for data_path in data_paths() {
        let started = Instant::now();
        let mut pids = Successors::new();
        let backend = echo_backend();
        let mut proxy = start(data_path, backend, "grace_period = \"1s\"");
        let mut streams = open_echo(proxy.listen, N);
        assert_spliced(data_path, &proxy.control, N as u64);

        let old = proxy.pid();
        // The old process closes each connection's two descriptors once the successor
        // took it: it dies once a few dozen moved, in the middle of the handoff.
        let before = fd_count(old);
        let request = spawn_upgrade(&proxy.control, None);
        let deadline = Instant::now() + WAIT;
        loop {
            if fd_count(old) + 120 <= before {
                break;
            }
            assert!(Instant::now() < deadline, "no connection moved");
            std::thread::sleep(Duration::from_millis(1));
        }
        let successor = match children_of(old)[..] {
            [pid] => pid,
            ref other => panic!("one successor, not {other:?}"),
        };
        pids.track(successor);
        proxy.signal(libc::SIGKILL);
        proxy.wait_exit(WAIT);
        let run = finish_upgrade_killed(request);

        wait_until("the successor says what it took", || {
            taken_over(&proxy.log(), old).is_some()
        });
        let (taken, complete) = taken_over(&proxy.log(), old).unwrap();
        eprintln!("{data_path}: the successor took {taken} of {N} (complete: {complete})");
        if !complete {
            assert_ne!(run, Some(0), "the CLI got no reply");
        }

        // Every connection is served or closed, none hangs: writes first, then reads.
        let mut served = Vec::new();
        for (i, stream) in streams.iter_mut().enumerate() {
            let _ = stream.write_all(format!("after {i:03}").as_bytes());
        }
        for (i, mut stream) in streams.into_iter().enumerate() {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let expected = format!("after {i:03}");
            let mut back = vec![0u8; expected.len()];
            match stream.read_exact(&mut back) {
                Ok(()) => {
                    assert_eq!(back, expected.as_bytes(), "connection {i}");
                    served.push(stream);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) => {}
                Err(e) => panic!("{data_path}: connection {i} neither served nor closed: {e}"),
            }
        }
        eprintln!("{data_path}: {} served", served.len());
        assert!(
            served.len() as u64 >= taken,
            "{data_path}: every connection the successor took is served: {} < {taken}",
            served.len()
        );

        // The successor serves on and accepts: it answers the control socket.
        all_served(&mut served, "again");
        let mut fresh = open_echo(proxy.listen, 1);
        let stats = stats_of(&proxy.control);
        assert_eq!(
            stats["connections"]["active"],
            served.len() as u64 + 1,
            "{data_path}: {stats}"
        );
        if splices(data_path) {
            assert_eq!(
                stats["connections"]["ebpf"],
                served.len() as u64 + 1,
                "spliced: {stats}"
            );
        }
        drop(served);
        drop(fresh.pop());
        assert_eq!(
            pids.stop(successor, libc::SIGTERM),
            Some(0),
            "{data_path}: the successor stops cleanly"
        );

        // A new proxy of the same configuration starts and serves (on the kernel path:
        // over the pins left behind).
        let log = proxy.config_file().with_file_name("fresh.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut fresh_proxy = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
            .arg("run")
            .arg("--config")
            .arg(proxy.config_file())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start smartproxy run");
        pids.track(fresh_proxy.id() as libc::pid_t);
        wait_until("the fresh proxy answers", || answers(&proxy.control));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
        let mut one = open_echo(proxy.listen, 1);
        all_served(&mut one, "fresh");
        assert_spliced(data_path, &proxy.control, 1);
        drop(one);
        // SAFETY: kill(2) on our child, not yet reaped.
        assert_eq!(
            unsafe { libc::kill(fresh_proxy.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = fresh_proxy.try_wait().expect("try_wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the fresh proxy still runs");
            std::thread::sleep(POLL);
        };
        pids.forget(fresh_proxy.id() as libc::pid_t);
        assert_eq!(
            status.code(),
            Some(0),
            "{data_path}: the fresh proxy stops cleanly"
        );
        eprintln!("{data_path}: {:?}", started.elapsed());
    }
}
