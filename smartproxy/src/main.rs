//! The `smartproxy` command: run, check, stats, connections, reload, upgrade.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use smartproxy::config::Config;
use smartproxy::control;
use smartproxy::fdlimit::{self, Fit};
use smartproxy::privileges;
use smartproxy::resolve::SystemResolver;
use smartproxy::stats::{ConnectionRow, Snapshot};
use smartproxy::view::{self, SortBy};
use smartproxy::{notify, upgrade, Proxy};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// jemalloc, for what `smartproxy::memory` says (`main` tells it so); the library's
/// tests keep the system's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration that does not load.
const EXIT_BAD_CONFIG: u8 = 2;
/// The control socket when neither `--control` nor `--config` says otherwise.
const DEFAULT_CONTROL_SOCKET: &str = "/run/smartproxy/control.sock";

#[derive(Debug, Parser)]
#[command(
    name = "smartproxy",
    version,
    about = "L4 proxy for long-lived TCP and TLS connections"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in the foreground (logs via RUST_LOG).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// `text` for people, `json` (one object per line) for log shippers.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration file: exit 0 if it loads, 2 if not.
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Totals from a running proxy.
    Stats {
        #[command(flatten)]
        target: ControlTarget,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// One row per live connection.
    Connections {
        #[command(flatten)]
        target: ControlTarget,
        #[arg(long)]
        json: bool,
        /// Order of the rows: bytes, age and idle put the largest first.
        #[arg(long, value_enum, default_value_t = SortBy::Id)]
        sort: SortBy,
        /// Only the connections of this route.
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
    },
    /// Make a running proxy re-read its configuration file (as SIGHUP does); exits 1 if
    /// the new configuration was refused (the running one stays in force).
    Reload {
        #[command(flatten)]
        target: ControlTarget,
    },
    /// Hand a running proxy over to a successor process started from its binary (or
    /// `--binary`), keeping every listener and connection (as SIGUSR2 does); exits 1 with
    /// the reason if the proxy keeps running everything itself.
    Upgrade {
        #[command(flatten)]
        target: ControlTarget,
        /// The binary to start instead of the one the proxy was started from (owned by
        /// root or the proxy's user, writable by nobody else).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Print the JSON reply.
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages or a shell's completions, generated from these definitions,
    /// into a directory (used to build the packages: `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Debug, Subcommand)]
enum Generate {
    /// smartproxy.1 and one page per subcommand (smartproxy-run.1, ...).
    Man { dir: PathBuf },
    /// The completion script for SHELL, named as that shell looks it up.
    Completions {
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the running proxy answers: `--control`, else the config's `control_socket`.
#[derive(Debug, clap::Args)]
struct ControlTarget {
    /// The control socket to ask.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Read the control socket path from this config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ControlTarget {
    fn path(&self) -> Result<PathBuf, ExitCode> {
        if let Some(path) = &self.control {
            return Ok(path.clone());
        }
        match &self.config {
            Some(file) => Ok(load_config(file)?.proxy.control_socket),
            None => Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        }
    }
}

fn main() -> ExitCode {
    smartproxy::memory::jemalloc_is_global();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config: path } => match load_config(&path) {
            Ok(config) => {
                // What `run` would say about the file descriptor limit, as this user.
                match fdlimit::attainable(&config) {
                    Ok(raise) => match raise.assessment.fit {
                        Fit::Enough => {}
                        Fit::Derived { .. } => eprintln!("note: {}", raise.assessment),
                        Fit::Short { .. } => eprintln!("warning: {}", raise.assessment),
                    },
                    Err(e) => eprintln!("warning: {e}"),
                }
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, log_format } => {
            init_logging(log_format);
            // Started by an upgrade: the predecessor waits for word, whatever happens.
            let inherited = match upgrade::inherit() {
                Ok(inherited) => inherited,
                Err(e) => {
                    eprintln!("error: cannot take over from the running proxy: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let refuser = inherited.as_ref().and_then(|i| i.refuser().ok());
            let refuse = |why: &str| {
                if let Some(refuser) = &refuser {
                    refuser.refuse(why);
                }
            };
            let config = match Config::from_file(&config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    refuse(&format!("the configuration does not load: {e}"));
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let successor = successor_command(&config, log_format);
            let result = run(config, inherited, successor);
            if let Err(e) = &result {
                refuse(&format!("{e:#}"));
            }
            report(result)
        }
        Command::Stats {
            target,
            json,
            watch,
        } => match target.path() {
            Ok(path) => report(stats(&path, json, watch)),
            Err(code) => code,
        },
        Command::Connections {
            target,
            json,
            sort,
            route,
        } => match target.path() {
            Ok(path) => report(connections(&path, json, sort, route.as_deref())),
            Err(code) => code,
        },
        Command::Reload { target } => match target.path() {
            Ok(path) => report(reload(&path)),
            Err(code) => code,
        },
        Command::Upgrade {
            target,
            binary,
            json,
        } => match target.path() {
            Ok(path) => report(upgrade_proxy(&path, binary.as_deref(), json)),
            Err(code) => code,
        },
        Command::Generate { what } => report(generate(what)),
    }
}

fn generate(what: Generate) -> Result<()> {
    use clap::CommandFactory;
    match what {
        Generate::Man { dir } => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("cannot write the man pages into {}", dir.display())),
        Generate::Completions { shell, dir } => {
            let path = clap_complete::generate_to(shell, &mut Cli::command(), "smartproxy", &dir)
                .with_context(|| {
                format!("cannot write {shell} completions into {}", dir.display())
            })?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        // Colours for a terminal only, not for a journal or a file.
        LogFormat::Text => logger
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        // Fields at the top level of each line, where log shippers look for them.
        LogFormat::Json => logger.json().flatten_event(true).init(),
    }
}

/// Loads and validates a config (certificates and keys included).
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::from_file(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the file descriptor limit for `config` and says where it still falls short.
fn raise_fd_limit(config: &Config) {
    match fdlimit::raise(config) {
        Ok(raise) => {
            if raise.after != raise.before {
                info!(
                    soft = raise.after.soft,
                    hard = raise.after.hard,
                    was_soft = raise.before.soft,
                    was_hard = raise.before.hard,
                    "file descriptor limit raised"
                );
            }
            raise.assessment.log();
        }
        Err(e) => warn!(error = %smartproxy::error_chain(&e), "file descriptor limit unchanged"),
    }
}

/// SIGTERM, SIGINT, SIGHUP and SIGUSR2 held back (`pthread_sigmask`) until their handlers exist.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn block() -> Result<BlockedSignals> {
        // SAFETY: sigemptyset/sigaddset initialise and fill a local set; pthread_sigmask
        // reads it and changes only this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
                libc::sigaddset(&mut set, signal);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc)).context("cannot block signals");
            }
            Ok(BlockedSignals(set))
        }
    }

    /// Unblocks them on this thread (the runtime's own threads keep them blocked, so the
    /// handlers run here).
    fn unblock(self) -> Result<()> {
        // SAFETY: pthread_sigmask reads the set made in `block`.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("cannot unblock signals");
        }
        Ok(())
    }
}

/// How an upgrade starts this proxy's successor: this binary, `run` with the same
/// configuration file (by absolute path) and log format.
fn successor_command(config: &Config, log_format: LogFormat) -> upgrade::SuccessorCommand {
    let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(file) = &config.source {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        args.extend(["run".into(), "--config".into(), file.into()]);
        let format = match log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        args.extend(["--log-format".into(), format.into()]);
    }
    upgrade::SuccessorCommand { binary, args }
}

fn run(
    config: Config,
    inherited: Option<upgrade::Inherited>,
    successor: upgrade::SuccessorCommand,
) -> Result<()> {
    // Before privileges are dropped: raising the hard limit takes CAP_SYS_RESOURCE.
    raise_fd_limit(&config);
    let user = config.proxy.user.clone();
    if user.is_some() {
        privileges::prepare()?;
    }
    let control_socket = config.proxy.control_socket.clone();
    let grace = config.lifecycle.grace_period;
    // Signals are blocked before any thread exists, so that every later thread inherits
    // the mask and a SIGTERM that arrives during setup waits for its handler.
    let signals = BlockedSignals::block()?;
    // Setup that needs privileges happens now, while the process has one thread; then
    // only what the data path still uses is kept, with `user` or without (under systemd
    // the unit's ambient capabilities would otherwise stay for good), and only then does
    // the runtime start its threads, which copy the reduced credentials.
    let mut prepared = Proxy::prepare_inherited(config, inherited)?;
    prepared.set_successor(successor);
    let keep = privileges::kept_capabilities(prepared.uses_ebpf());
    match &user {
        Some(user) => {
            privileges::drop_to(user, &control_socket, prepared.pin_dir(), keep)
                .with_context(|| format!("cannot run as user {:?}", user.name))?;
            info!(user = %user.name, uid = user.uid, capabilities = format_args!("{keep:#x}"), "privileges dropped");
        }
        None => {
            let kept = privileges::keep_only(keep).context("cannot drop capabilities")?;
            info!(
                capabilities = format_args!("{kept:#x}"),
                "capabilities dropped"
            );
        }
    }
    // The control plane (signals, the control socket, the metrics endpoint, health
    // checks, the kernel's events) runs on this thread; the listeners' accept loops and
    // the connections run on a runtime per core that `Proxy::start_prepared` starts
    // (`smartproxy/src/workers.rs`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let mut user2 =
            signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
        // The handlers are in place: a signal that came during setup is delivered now.
        signals.unblock()?;
        let proxy = Arc::new(Proxy::start_prepared(prepared, Arc::new(SystemResolver)).await?);
        if let Some(taken) = proxy.take_over().await {
            let taken = taken.context("taking over from the running proxy")?;
            info!(predecessor = taken.predecessor, connections = taken.connections, complete = taken.complete, "took over from the predecessor");
            // The service is this process from now on (the unit needs NotifyAccess=all).
            service_manager(&format!("MAINPID={}", std::process::id()));
        }
        info!("ready");
        service_manager("READY=1");
        let signal = loop {
            tokio::select! {
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = proxy.handed_off() => break "upgrade",
                _ = user2.recv() => {
                    // On a task of its own, as one asked on the control socket: a stop
                    // meanwhile is seen here, and passed on to the successor once it
                    // confirmed (docs/upgrade.md).
                    let upgrading = Arc::clone(&proxy);
                    tokio::spawn(async move {
                        match upgrading.upgrade(None).await {
                            Ok(upgraded) => info!(new_pid = upgraded.new_pid, moved = upgraded.moved, staying = upgraded.staying, "upgraded (SIGUSR2)"),
                            Err(e) => warn!(
                                error = %smartproxy::error_chain(&e),
                                "upgrade failed (SIGUSR2); this proxy keeps running everything"
                            ),
                        }
                    });
                }
                _ = hangup.recv() => match proxy.reload().await {
                    Ok(summary) => info!(%summary, "configuration reloaded (SIGHUP)"),
                    Err(e) => warn!(
                        error = %smartproxy::error_chain(&e),
                        "reload refused (SIGHUP); the running configuration stays in force"
                    ),
                },
            }
        };
        if signal == "upgrade" {
            // The successor is the service now: no STOPPING=1 from here.
            info!(grace_period = ?grace, "handed over to the successor; draining what stayed here");
        } else {
            info!(signal, grace_period = ?grace, "shutting down: no new connections");
            service_manager("STOPPING=1");
        }
        proxy.shutdown();
        let stopped = proxy.wait();
        tokio::pin!(stopped);
        // A second signal ends the drain at once, as most servers do.
        let second = tokio::select! {
            _ = &mut stopped => None,
            _ = terminate.recv() => Some("SIGTERM"),
            _ = interrupt.recv() => Some("SIGINT"),
        };
        if let Some(signal) = second {
            warn!(signal, "second signal: cutting the connections still open");
            proxy.cut();
            stopped.await;
        }
        info!("stopped");
        Ok(())
    })
}

/// Tells systemd (`Type=notify`) what the proxy does; a failure is logged, not fatal.
fn service_manager(state: &str) {
    if let Err(e) = notify::notify(state) {
        warn!(state, error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

fn fetch<T: serde::de::DeserializeOwned>(path: &Path, request: &str) -> Result<T> {
    let reply = control::query(path, request)?;
    serde_json::from_slice(&reply).with_context(|| {
        format!(
            "control socket {}: unexpected reply to {request:?}",
            path.display()
        )
    })
}

fn reload(path: &Path) -> Result<()> {
    let reply: control::ReloadReply = fetch(path, "reload")?;
    if !reply.ok {
        anyhow::bail!(
            "reload refused; the running configuration stays in force: {}",
            reply.message
        );
    }
    println!("reloaded: {}", reply.message);
    Ok(())
}

fn upgrade_proxy(path: &Path, binary: Option<&Path>, json: bool) -> Result<()> {
    let request = match binary {
        Some(binary) => {
            let binary = std::path::absolute(binary)
                .with_context(|| format!("cannot resolve {}", binary.display()))?;
            format!("upgrade {}", binary.display())
        }
        None => "upgrade".to_owned(),
    };
    let reply: control::UpgradeReply = fetch(path, &request)?;
    if json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    if !reply.ok {
        if json {
            std::process::exit(1);
        }
        anyhow::bail!(
            "upgrade failed; the running proxy keeps everything: {}",
            reply.message
        );
    }
    if !json {
        println!("upgraded: {}", reply.message);
    }
    Ok(())
}

fn stats(path: &Path, json: bool, watch: bool) -> Result<()> {
    if watch {
        return watch_stats(path, json);
    }
    let snapshot: Snapshot = fetch(path, "stats")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", view::render_stats(&snapshot, None));
    }
    Ok(())
}

/// `stats --watch`: a frame a second until SIGINT (Ctrl-C), which ends it with exit 0.
fn watch_stats(path: &Path, json: bool) -> Result<()> {
    use std::io::Write;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // Before the first request: from now on SIGINT is ours, not the default action.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut previous: Option<(Snapshot, tokio::time::Instant)> = None;
        loop {
            let snapshot: Snapshot = fetch(path, "stats-watch")?;
            let now = tokio::time::Instant::now();
            let frame = if json {
                format!("{}\n", serde_json::to_string(&snapshot)?)
            } else {
                let previous = previous.as_ref().map(|(s, at)| (s, now - *at));
                // Clear the screen and home the cursor, as `watch(1)` does.
                format!("\x1b[2J\x1b[H{}", view::render_stats(&snapshot, previous))
            };
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(frame.as_bytes())?;
            stdout.flush()?;
            drop(stdout);
            previous = Some((snapshot, now));
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

fn connections(path: &Path, json: bool, sort: SortBy, route: Option<&str>) -> Result<()> {
    let rows: Vec<ConnectionRow> = fetch(path, "connections")?;
    let rows = view::select_connections(rows, sort, route);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", view::render_connections(&rows));
    }
    Ok(())
}
