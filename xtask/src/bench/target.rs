//! The targets a scenario runs against: the backend itself (direct), smartproxy on each of its
//! data paths (auto, ebpf, userspace), HAProxy with and without splicing, nginx's stream
//! module. A proxy is a child process with a generated config in its own temporary directory;
//! it is stopped (SIGTERM, then SIGKILL) when dropped. After `smartproxy upgrade` the proxy is
//! the successor process the command reported, which the bench stops instead.

use std::{
    fmt, fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::ValueEnum;

use super::{config, system};

/// How long a proxy may take from spawn to answering its control (or stats) socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a proxy may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Target {
    /// The client connects straight to the backend: the limit.
    Direct,
    /// smartproxy, `data_path = "auto"` (its default) with the default `auto_*` knobs: each
    /// connection starts on the userspace relay and moves into the kernel when both
    /// directions reach `auto_splice_rate`.
    Auto,
    /// smartproxy, `data_path = "ebpf"`.
    Ebpf,
    /// smartproxy, `data_path = "userspace"`.
    Userspace,
    /// HAProxy, `mode tcp`.
    Haproxy,
    /// HAProxy, `mode tcp` with `option splice-request` and `option splice-response`.
    HaproxySplice,
    /// nginx, a `stream {}` server with `proxy_pass`.
    Nginx,
}

impl Target {
    /// What runs without `--targets`: auto, smartproxy's default, right after direct.
    pub const DEFAULT: [Target; 4] = [
        Target::Direct,
        Target::Auto,
        Target::Ebpf,
        Target::Userspace,
    ];
    pub const PEERS: [Target; 3] = [Target::Haproxy, Target::HaproxySplice, Target::Nginx];

    /// The name on the command line and in the report; for smartproxy also its `data_path`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Auto => "auto",
            Target::Ebpf => "ebpf",
            Target::Userspace => "userspace",
            Target::Haproxy => "haproxy",
            Target::HaproxySplice => "haproxy-splice",
            Target::Nginx => "nginx",
        }
    }

    /// smartproxy on one of its data paths (the name is the `data_path`).
    pub fn is_smartproxy(self) -> bool {
        matches!(self, Target::Auto | Target::Ebpf | Target::Userspace)
    }

    pub fn is_haproxy(self) -> bool {
        matches!(self, Target::Haproxy | Target::HaproxySplice)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What starting a target needs.
pub struct Launch<'a> {
    /// The smartproxy binary; None when no smartproxy target runs.
    pub smartproxy: Option<&'a Path>,
    pub backend: SocketAddr,
    pub limits: config::Limits,
    /// smartproxy's `max_queued_bytes`.
    pub max_queued: u64,
    /// How to start nginx; None when no nginx target runs.
    pub nginx: Option<&'a super::nginx::Nginx>,
}

/// A target ready for connections.
pub struct Running {
    target: Target,
    /// Where clients connect.
    addr: SocketAddr,
    process: Option<Process>,
}

struct Process {
    child: Child,
    /// Where the proxy's stdout and stderr go.
    log: PathBuf,
    /// smartproxy's control socket (None for HAProxy and nginx).
    control: Option<PathBuf>,
    /// The process that took over from `child` in `smartproxy upgrade` (not our child).
    successor: Option<u32>,
    /// Holds the config, the log and the sockets; removed after the process is gone.
    _dir: TempDir,
}

impl Running {
    pub fn start(target: Target, launch: &Launch<'_>) -> Result<Self> {
        match target {
            Target::Direct => Ok(Self {
                target,
                addr: launch.backend,
                process: None,
            }),
            Target::Auto | Target::Ebpf | Target::Userspace => {
                let binary = launch
                    .smartproxy
                    .ok_or_else(|| anyhow!("no smartproxy binary to start {target} with"))?;
                Self::smartproxy(target, binary, |listen, control| {
                    config::smartproxy(
                        target.name(),
                        listen,
                        launch.backend,
                        control,
                        launch.limits.smartproxy_max_connections(),
                        Some(launch.max_queued),
                        config::BENCH_LIFECYCLE,
                    )
                })
            }
            Target::Haproxy | Target::HaproxySplice => {
                let dir = TempDir::new(target.name())?;
                let listen = free_port()?;
                let stats = dir.path().join("haproxy.sock");
                let text = config::haproxy(
                    listen,
                    launch.backend,
                    &stats,
                    target == Target::HaproxySplice,
                    launch.limits,
                );
                let file = write_file(&dir.path().join("haproxy.cfg"), &text)?;
                let mut cmd = Command::new("haproxy");
                // -db: stay in the foreground, no daemon, no master process.
                cmd.arg("-f").arg(file).arg("-db");
                Self::spawn(target, dir, listen, cmd, None, stats)
            }
            Target::Nginx => {
                let nginx = launch
                    .nginx
                    .ok_or_else(|| anyhow!("nginx was not set up (run with --with-peers)"))?;
                let dir = TempDir::new(target.name())?;
                let listen = free_port()?;
                let ready = dir.path().join("ready.sock");
                let text = config::nginx(
                    listen,
                    launch.backend,
                    dir.path(),
                    &ready,
                    nginx.load_module.as_deref(),
                    launch.limits,
                );
                let file = write_file(&dir.path().join("nginx.conf"), &text)?;
                let mut cmd = Command::new("nginx");
                // -e: its startup messages to stderr (the log), not the distribution's path;
                // -p: relative paths under the temporary directory.
                cmd.arg("-c")
                    .arg(file)
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg("stderr");
                Self::spawn(target, dir, listen, cmd, None, ready)
            }
        }
    }

    /// Starts `binary` (smartproxy, `target` being its data path) on the config that
    /// `config(listen, control_socket)` returns, and waits until it is ready.
    pub fn smartproxy(
        target: Target,
        binary: &Path,
        config: impl FnOnce(SocketAddr, &Path) -> String,
    ) -> Result<Self> {
        let dir = TempDir::new(target.name())?;
        let listen = free_port()?;
        let control = dir.path().join("control.sock");
        let file = write_file(
            &dir.path().join("smartproxy.toml"),
            &config(listen, &control),
        )?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--config")
            .arg(file)
            // Per-connection logging would be part of what is measured.
            .env("RUST_LOG", "warn");
        Self::spawn(target, dir, listen, cmd, Some(control.clone()), control)
    }

    /// Spawns a proxy with its output in `dir/proxy.log` and waits until `ready_socket`
    /// answers.
    fn spawn(
        target: Target,
        dir: TempDir,
        listen: SocketAddr,
        mut cmd: Command,
        control: Option<PathBuf>,
        ready_socket: PathBuf,
    ) -> Result<Self> {
        let log = dir.path().join("proxy.log");
        let out = fs::File::create(&log)
            .with_context(|| format!("failed to create {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("failed to reopen {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {target}: {cmd:?}"))?;
        let mut running = Self {
            target,
            addr: listen,
            process: Some(Process {
                child,
                log,
                control,
                successor: None,
                _dir: dir,
            }),
        };
        if let Err(e) = running.wait_ready(&ready_socket) {
            if let Some(mut process) = running.process.take() {
                // It may still run (not ready in time); its log is in the error already.
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
            return Err(e.context(format!("{target} did not become ready ({cmd:?})")));
        }
        Ok(running)
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's process id (its successor's after an upgrade); None for direct.
    pub fn pid(&self) -> Option<u32> {
        self.process
            .as_ref()
            .map(|p| p.successor.unwrap_or_else(|| p.child.id()))
    }

    /// smartproxy's control socket; None for other targets.
    pub fn control(&self) -> Option<&Path> {
        self.process.as_ref().and_then(|p| p.control.as_deref())
    }

    /// Records that `pid` took over the proxy (`smartproxy upgrade`): it is the one stopped
    /// from now on, and the original process is expected to exit on its own.
    pub fn handed_over(&mut self, pid: u32) {
        if let Some(process) = self.process.as_mut() {
            process.successor = Some(pid);
        }
    }

    /// Waits until the socket at `path` accepts a connection (smartproxy binds its control
    /// socket after its listeners; HAProxy binds its stats socket with its listeners).
    fn wait_ready(&mut self, path: &Path) -> Result<()> {
        let process = self
            .process
            .as_mut()
            .expect("wait_ready is only called for proxies");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process
                .child
                .try_wait()
                .context("failed to poll the proxy process")?
            {
                bail!("it exited with {status}; log:\n{}", log_tail(&process.log));
            }
            if UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} does not answer after {READY_TIMEOUT:?}; log:\n{}",
                    path.display(),
                    log_tail(&process.log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `smartproxy stats` as JSON (None for targets without a control socket).
    pub fn stats(&self) -> Result<Option<serde_json::Value>> {
        let Some(control) = self.process.as_ref().and_then(|p| p.control.as_ref()) else {
            return Ok(None);
        };
        let fail = || format!("control socket {}: stats request failed", control.display());
        let mut stream = UnixStream::connect(control).with_context(fail)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .with_context(fail)?;
        stream.write_all(b"stats\n").with_context(fail)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).with_context(fail)?;
        let json = serde_json::from_slice(&reply).with_context(|| {
            format!(
                "control socket {}: stats reply is not JSON",
                control.display()
            )
        })?;
        Ok(Some(json))
    }

    /// Waits (bounded) until smartproxy has no active connection, so that its byte counters
    /// are final; a no-op for other targets.
    pub fn wait_idle(&self, limit: Duration) -> Result<Option<serde_json::Value>> {
        let deadline = Instant::now() + limit;
        loop {
            let Some(stats) = self.stats()? else {
                return Ok(None);
            };
            let active = stats
                .pointer("/connections/active")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            if active == 0 || Instant::now() >= deadline {
                return Ok(Some(stats));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the proxy: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]. Fails if it had died
    /// before being asked to stop (the run's numbers are then suspect).
    pub fn stop(mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.stop(self.target),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            if let Err(e) = process.stop(self.target) {
                eprintln!("bench: {e:#}");
            }
        }
    }
}

impl Process {
    fn stop(mut self, target: Target) -> Result<()> {
        // A successor that is our own child (a stand-in that reports the same process) is
        // stopped as the child.
        if let Some(successor) = self.successor.filter(|&pid| pid != self.child.id()) {
            return self.stop_successor(target, successor);
        }
        if let Some(status) = self.child.try_wait().context("failed to poll the proxy")? {
            bail!(
                "{target} had exited before the bench stopped it ({status}); log:\n{}",
                log_tail(&self.log)
            );
        }
        // Listed before it stops, while they are still its children: nginx's workers, and
        // the successor of an upgrade that did not complete, which would outlive it.
        let descendants = system::process_tree(self.child.id()).unwrap_or_else(|e| {
            eprintln!("bench: cannot list the processes {target} started: {e:#}");
            Vec::new()
        });
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut exited = false;
        while !exited && Instant::now() < deadline {
            exited = self
                .child
                .try_wait()
                .context("failed to poll the proxy")?
                .is_some();
            if !exited {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if !exited {
            self.child.kill().context("failed to kill the proxy")?;
            self.child.wait().context("failed to reap the proxy")?;
            eprintln!(
                "bench: {target} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it; log:\n{}",
                log_tail(&self.log)
            );
        }
        for outlived in descendants.into_iter().filter(|&p| p != self.child.id()) {
            let pid = libc::pid_t::try_from(outlived).context("pid out of range")?;
            if terminate(pid) != Termination::NotRunning {
                eprintln!(
                    "bench: a process {target} started (pid {outlived}) outlived it; stopped it"
                );
            }
        }
        Ok(())
    }
}

/// What [`terminate`] found and did.
#[derive(Debug, PartialEq, Eq)]
enum Termination {
    NotRunning,
    Exited,
    Killed,
}

/// SIGTERM to `pid`, and SIGKILL if it still runs after [`STOP_TIMEOUT`]. Not for a child
/// of ours, which must be reaped instead.
fn terminate(pid: libc::pid_t) -> Termination {
    // Not a zombie: one whose parent died is init's to reap.
    let alive = || {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
    };
    if !alive() {
        return Termination::NotRunning;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    if !alive() {
        return Termination::Exited;
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    Termination::Killed
}

impl Process {
    /// After an upgrade: SIGTERM the successor (then SIGKILL), and reap the original process,
    /// which should have exited once it handed everything over (else it is stopped too).
    fn stop_successor(mut self, target: Target, pid: u32) -> Result<()> {
        let pid_t = libc::pid_t::try_from(pid).context("pid out of range")?;
        // The successor the upgrade command reported for the proxy this bench started.
        if terminate(pid_t) == Termination::Killed {
            eprintln!(
                "bench: {target}'s successor (pid {pid}) did not exit within {STOP_TIMEOUT:?} \
                 of SIGTERM; killed it"
            );
        }
        if self
            .child
            .try_wait()
            .context("failed to poll the proxy")?
            .is_none()
        {
            let old = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(old, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while self
                .child
                .try_wait()
                .context("failed to poll the proxy")?
                .is_none()
            {
                if Instant::now() >= deadline {
                    self.child.kill().context("failed to kill the proxy")?;
                    self.child.wait().context("failed to reap the proxy")?;
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// A loopback address with a port nobody listens on right now. Another process could take it
/// before the proxy binds it; the proxy then fails to start and says so.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    listener
        .local_addr()
        .context("getsockname of a 127.0.0.1:0 socket failed")
}

fn write_file(path: &Path, text: &str) -> Result<PathBuf> {
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path.to_owned())
}

/// The last lines of a proxy log, for error messages.
fn log_tail(path: &Path) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A directory under the system temp dir, removed with everything in it when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(label: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "smartproxy-bench-{}-{n}-{label}",
            std::process::id()
        ));
        fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Makes sure `haproxy` runs, installing the distribution package if it does not (and saying
/// so). It is only ever run by the bench in the foreground, never as a service.
pub fn ensure_haproxy() -> Result<String> {
    crate::packages::ensure("bench", "haproxy", &["-v"], "haproxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_default_target_after_direct() {
        assert_eq!(Target::DEFAULT[..2], [Target::Direct, Target::Auto]);
        assert_eq!(Target::Auto.name(), "auto");
        assert!(Target::DEFAULT[1..].iter().all(|t| t.is_smartproxy()));
        assert!(!Target::PEERS.iter().any(|t| t.is_smartproxy()));
        assert!(!Target::Direct.is_smartproxy());
        // `--targets auto` names it as the report does.
        assert_eq!(Target::from_str("auto", false), Ok(Target::Auto));
    }
}
