//! The `smartproxy` command: run, check, stats, connections.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use smartproxy::config::Config;
use smartproxy::control;
use smartproxy::stats::{ConnectionRow, Snapshot};
use smartproxy::Proxy;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

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
    },
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
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_config(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            init_logging();
            let config = match load_config(&config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            report(run(config))
        }
        Command::Stats {
            target,
            json,
            watch,
        } => match target.path() {
            Ok(path) => report(stats(&path, json, watch)),
            Err(code) => code,
        },
        Command::Connections { target, json } => match target.path() {
            Ok(path) => report(connections(&path, json)),
            Err(code) => code,
        },
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
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

fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives once we are listening must not kill us.
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let grace = config.lifecycle.grace_period;
        let proxy = Proxy::start(config).await?;
        info!("ready");
        let signal = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        info!(signal, grace_period = ?grace, "shutting down: no new connections");
        proxy.shutdown();
        proxy.wait().await;
        info!("stopped");
        Ok(())
    })
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

fn stats(path: &Path, json: bool, watch: bool) -> Result<()> {
    let mut previous: Option<(Snapshot, std::time::Instant)> = None;
    loop {
        let snapshot: Snapshot = fetch(path, "stats")?;
        if json {
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
        } else {
            if watch {
                // Clear the screen and home the cursor, as `watch(1)` does.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_stats(&snapshot, previous.as_ref()));
        }
        if !watch {
            return Ok(());
        }
        previous = Some((snapshot, std::time::Instant::now()));
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn render_stats(s: &Snapshot, previous: Option<&(Snapshot, std::time::Instant)>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &s.connections;
    let _ = writeln!(
        out,
        "data path   {}    uptime {}s",
        s.data_path, s.uptime_secs
    );
    let _ = writeln!(
        out,
        "connections active {}  half-open {}  total {}  (ebpf {}, userspace {})",
        c.active, c.half_open, c.total, c.ebpf, c.userspace
    );
    let _ = writeln!(
        out,
        "bytes       client->backend {}  backend->client {}",
        s.bytes.client_to_backend, s.bytes.backend_to_client
    );
    if let Some((before, at)) = previous {
        let secs = at.elapsed().as_secs_f64().max(0.001);
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
        let _ = writeln!(
            out,
            "rates       {:.1} conn/s  client->backend {:.0} B/s  backend->client {:.0} B/s",
            rate(c.total, before.connections.total),
            rate(s.bytes.client_to_backend, before.bytes.client_to_backend),
            rate(s.bytes.backend_to_client, before.bytes.backend_to_client),
        );
    }
    let _ = writeln!(
        out,
        "ebpf        sockhash entries {}  events {}  events lost {}",
        s.ebpf.sockhash_entries, s.ebpf.events, s.ebpf.events_lost
    );
    let _ = writeln!(out, "closed");
    for (reason, count) in &s.closed {
        let _ = writeln!(out, "  {reason:<20} {count}");
    }
    let _ = writeln!(
        out,
        "{:<20} {:>8} {:>10} {:>16} {:>16}",
        "route", "active", "total", "client->backend", "backend->client"
    );
    for r in &s.routes {
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>10} {:>16} {:>16}",
            r.name, r.active, r.total, r.bytes_client_to_backend, r.bytes_backend_to_client
        );
    }
    out
}

fn connections(path: &Path, json: bool) -> Result<()> {
    let rows: Vec<ConnectionRow> = fetch(path, "connections")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>8} {:<16} {:<22} {:<22} {:<9} {:>9} {:>9} {:>5} {:>14} {:>14}",
        "id", "route", "client", "backend", "path", "age_s", "idle_s", "half", "c->b", "b->c"
    );
    for row in rows {
        println!(
            "{:>8} {:<16} {:<22} {:<22} {:<9} {:>9.1} {:>9.1} {:>5} {:>14} {:>14}",
            row.id,
            row.route.as_deref().unwrap_or("-"),
            row.client,
            row.backend.as_deref().unwrap_or("-"),
            row.data_path.map_or("-", |p| p.as_str()),
            row.age_secs,
            row.idle_secs,
            if row.half_open { "yes" } else { "no" },
            row.bytes_client_to_backend,
            row.bytes_backend_to_client,
        );
    }
    Ok(())
}
