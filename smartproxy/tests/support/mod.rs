//! What the tests of the `smartproxy` binary share: loopback helpers and a
//! `smartproxy run` child process that is killed (and its log shown) when a test fails.
#![allow(
    dead_code,
    reason = "each test binary uses its own part of this module"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// One harness for both kinds of tests: what these share with the end-to-end tests
// (`tests/`) lives in `smartproxy-test-support`.
pub use smartproxy_test_support::*;

/// Connects to `addr` and returns the one-byte tag a [`tagged_backend`] sent.
pub fn tag_of(addr: SocketAddr) -> u8 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the proxy");
    stream
        .set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    let mut tag = [0u8];
    std::io::Read::read_exact(&mut stream, &mut tag).expect("read the backend's tag");
    tag[0]
}

/// From `/proc/PID/stat`: user + system CPU time in clock ticks.
pub fn cpu_ticks(pid: libc::pid_t) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name may hold spaces; the fields after it start past the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
        .split(' ')
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Whether a proxy answers a `stats` request on `control` within a second (one that
/// accepts and never answers must not hang the caller's wait).
pub fn answers(control: &std::path::Path) -> bool {
    smartproxy::control::query_within(control, "stats", Some(Duration::from_secs(1)))
        .is_ok_and(|reply| !reply.is_empty())
}

/// The open descriptors of process `pid`.
pub fn fd_count(pid: libc::pid_t) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

/// A line of `/proc/PID/status` (`VmRSS`, `Uid`, `CapEff`), without its key.
pub fn proc_status(pid: libc::pid_t, key: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The data paths to run a binary test on: userspace, and where the kernel path loads,
/// ebpf and auto. Their `[proxy]` lines are [`data_path_lines`]: on auto, knobs that
/// splice each connection at its first read and keep it in the kernel.
pub fn data_paths() -> Vec<&'static str> {
    let mut paths = vec!["userspace"];
    if ebpf_or_skip(
        "the ebpf and auto data paths",
        smartproxy::datapath::probe_ebpf,
    )
    .is_some()
    {
        paths.extend(["ebpf", "auto"]);
    }
    paths
}

/// The path a proxy on `data_path` books its connections on once their first bytes
/// moved: the `connections.<path>` key of `stats` and the `data_path` label of the
/// metrics. The kernel one on auto too, with the knobs of [`data_path_lines`].
pub fn booked_path(data_path: &str) -> &'static str {
    match data_path {
        "userspace" => "userspace",
        "ebpf" | "auto" => "ebpf",
        other => panic!("no data path {other:?}"),
    }
}

/// Whether a proxy on `data_path` splices its connections (see [`booked_path`]).
pub fn splices(data_path: &str) -> bool {
    booked_path(data_path) == "ebpf"
}

/// `GET /metrics` from `addr` (a `[proxy] metrics` endpoint): the whole response.
pub fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("the metrics endpoint answers");
    response
}

/// Sends `message` and reads the echo back.
pub fn echo_once(stream: &mut std::net::TcpStream, message: &[u8]) {
    use std::io::{Read, Write};
    stream
        .set_read_timeout(Some(WAIT))
        .expect("set a read timeout");
    stream.write_all(message).expect("client writes");
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back).expect("the echo comes back");
    assert_eq!(back, message);
}

// === the proxy process ===

/// The `[proxy]` line of a proxy on the userspace data path.
pub const USERSPACE: &str = "data_path = \"userspace\"";

/// A `smartproxy run` child. Dropping it kills the process if it still runs, and prints
/// its log when the test is failing.
pub struct ProxyProcess {
    pub child: Child,
    pub control: PathBuf,
    log: PathBuf,
    pub listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Starts `smartproxy run` with one plain route `route` on a free loopback port to
    /// `backend` (userspace data path, control socket in a temporary directory), with
    /// `lifecycle` as its `[lifecycle]` table body, and waits until it is ready.
    pub fn start(route: &str, backend: SocketAddr, lifecycle: &str) -> ProxyProcess {
        Self::start_with(route, backend, lifecycle, USERSPACE)
    }

    /// [`ProxyProcess::start`] with `proxy` as the `[proxy]` lines besides the control
    /// socket (data path, limits, user).
    pub fn start_with(
        route: &str,
        backend: SocketAddr,
        lifecycle: &str,
        proxy: &str,
    ) -> ProxyProcess {
        Self::start_configured(route, backend, lifecycle, proxy, |_| {})
    }

    /// [`ProxyProcess::start_with`], and `configure` may change the command before it
    /// runs (a `pre_exec`, say).
    pub fn start_configured(
        route: &str,
        backend: SocketAddr,
        lifecycle: &str,
        proxy: &str,
        configure: impl FnOnce(&mut Command),
    ) -> ProxyProcess {
        Self::start_routes(route, backend, lifecycle, proxy, "", configure)
    }

    /// [`ProxyProcess::start_configured`] with `routes` (more `[[route]]` tables, TOML)
    /// after the first route.
    pub fn start_routes(
        route: &str,
        backend: SocketAddr,
        lifecycle: &str,
        proxy: &str,
        routes: &str,
        configure: impl FnOnce(&mut Command),
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let control = dir.path().join("control.sock");
        let listen = free_port();
        let config = dir.path().join("smartproxy.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\n{proxy}\ncontrol_socket = {control:?}\n\n\
                 [lifecycle]\n{lifecycle}\n\n\
                 [[route]]\nname = \"{route}\"\nlisten = \"{listen}\"\ntargets = [\"{backend}\"]\n\n{routes}",
                control = control.display().to_string(),
            ),
        )
        .expect("write the config");
        let log = dir.path().join("proxy.log");
        let out = std::fs::File::create(&log).expect("create the proxy log");
        let err = out.try_clone().expect("clone the proxy log handle");
        let mut command = Command::new(env!("CARGO_BIN_EXE_smartproxy"));
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        configure(&mut command);
        let child = command.spawn().expect("the smartproxy binary starts");
        let mut proxy = ProxyProcess {
            child,
            control,
            log,
            listen,
            _dir: dir,
        };
        proxy.wait_ready();
        proxy
    }

    /// The config file the proxy was started with (and re-reads on reload).
    pub fn config_file(&self) -> PathBuf {
        self._dir.path().join("smartproxy.toml")
    }

    /// Polls until the control socket answers: the proxy started everything then (its
    /// listeners and its connection runtimes). A connect alone succeeds as soon as the
    /// socket is bound, before that.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if answers(&self.control) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait on the proxy") {
                panic!("the proxy exited before it was ready: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "no control socket at {} after {WAIT:?}",
                self.control.display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// What the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// `smartproxy stats --json` of this proxy, parsed.
    pub fn stats(&self) -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_smartproxy"))
            .args(["stats", "--json", "--control"])
            .arg(&self.control)
            .output()
            .expect("run smartproxy stats");
        assert!(output.status.success(), "smartproxy stats: {output:?}");
        serde_json::from_slice(&output.stdout).expect("stats --json is JSON")
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (we hold `Child`).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.child.id());
    }

    /// Waits for the process to exit by itself within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
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

// === processes an upgrade starts ===

/// The pid in the old process's "upgrade: successor started" log line.
pub fn successor_pid(log: &str) -> Option<libc::pid_t> {
    let line = log
        .lines()
        .find(|line| line.contains("upgrade: successor started"))?;
    let (_, rest) = line.split_once(" pid=")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The processes an upgrade test sees besides its `ProxyProcess` (successors, fresh
/// starts): killed and reaped on drop, a failing test included. Creating it makes the test
/// process a child subreaper, so that a successor becomes its child once its parent (the
/// old proxy) exited, and can be waited for.
pub struct Successors(Vec<libc::pid_t>);

impl Successors {
    pub fn new() -> Successors {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(
            rc,
            0,
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
        Successors(Vec::new())
    }

    pub fn track(&mut self, pid: libc::pid_t) {
        assert!(pid > 1, "a process id: {pid}");
        if !self.0.contains(&pid) {
            self.0.push(pid);
        }
    }

    /// `pid` was reaped elsewhere: not to be killed.
    pub fn forget(&mut self, pid: libc::pid_t) {
        self.0.retain(|p| *p != pid);
    }

    /// Waits (bounded) for `pid`, a proxy orphaned to this process, to exit by itself,
    /// and returns its exit code.
    pub fn wait_exit(&mut self, pid: libc::pid_t) -> libc::c_int {
        match self.reap(pid) {
            Some(Ok(code)) => code,
            Some(Err(status)) => {
                panic!("process {pid} did not exit by itself (wait status {status:#x})")
            }
            None => panic!(
                "waitpid({pid}): not a child of this subreaper, and gone: {}",
                std::io::Error::last_os_error()
            ),
        }
    }

    /// Sends `signal` to `pid` and waits (bounded) for it to exit; its exit code if this
    /// process reaped it (128 + the signal when a signal ended it), `None` when it was not
    /// this process's child and is gone.
    pub fn stop(&mut self, pid: libc::pid_t, signal: libc::c_int) -> Option<i32> {
        // SAFETY: kill(2) on a process this test started, not yet reaped by us.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
        self.reap(pid)
            .map(|exited| exited.unwrap_or_else(|status| 128 + libc::WTERMSIG(status)))
    }

    /// Waits (bounded) for `pid`: `Ok(exit code)`, `Err(wait status)` when a signal ended
    /// it, `None` when it is not our child and gone.
    fn reap(&mut self, pid: libc::pid_t) -> Option<Result<i32, i32>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc == pid {
                self.forget(pid);
                assert!(
                    !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                    "process {pid} reaped and still in /proc"
                );
                return Some(if libc::WIFEXITED(status) {
                    Ok(libc::WEXITSTATUS(status))
                } else {
                    Err(status)
                });
            }
            if rc < 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                self.forget(pid);
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} still runs {WAIT:?} later"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.0) {
            // SAFETY: kill(2) and waitpid on processes this test started and has not
            // reaped: their pids cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                let mut status = 0;
                let deadline = Instant::now() + Duration::from_secs(5);
                while libc::waitpid(pid, &mut status, libc::WNOHANG) == 0
                    && Instant::now() < deadline
                {
                    std::thread::sleep(POLL);
                }
            }
        }
    }
}
