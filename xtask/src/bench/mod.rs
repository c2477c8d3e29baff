//! `cargo xtask bench`: the same load scenarios against a direct connection, smartproxy on
//! each data path (auto, its default, then ebpf and userspace) and (with `--with-peers`)
//! HAProxy and nginx, interleaved, reported as Markdown tables (one per scenario family) of
//! medians with ratios to direct.
//!
//! Needs root (the ebpf path, and the fd limit for 10,000 idle connections). The load
//! generator and backend are part of this process; a debug build of xtask re-runs itself in
//! release first so that they do not skew what they measure.

mod backend;
pub(crate) mod config;
mod estimate;
mod metric;
mod nginx;
mod report;
mod scenario;
pub(crate) mod system;
pub(crate) mod target;
mod units;
mod wire;

use std::{
    cell::Cell,
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, ExitCode},
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context as _, Result};
use clap::Parser;

use self::{
    backend::Backend,
    metric::{Measurement, Metric},
    report::{Machine, Results},
    scenario::{Env, Params, Scenario},
    target::{Launch, Running, Target},
    units::{parse_bytes, show_bytes, show_number},
};
use crate::{run, toolchain};

/// Set on the release re-run, so that it never re-runs itself again.
const REEXEC_ENV: &str = "SMARTPROXY_BENCH_RELEASE";
/// File descriptors a process needs besides two per idle connection (stdio, runtime, listeners,
/// control socket, eBPF maps and programs, logs).
const FD_RESERVE: u64 = 256;

#[derive(Debug, Parser)]
pub struct Options {
    /// Scenarios, comma-separated: names as listed in bench/README.md (bulk-upload-4,
    /// rr-32x64, churn-server-close, idle, slow-reader, upgrade, ...) or a family (bulk,
    /// bulk-upload, bulk-download, bulk-duplex, rr, churn). Default: the subset that fits
    /// 15 minutes.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Every scenario (upgrade only if the smartproxy binary has the subcommand).
    #[arg(long, conflicts_with = "scenarios")]
    all: bool,
    /// Targets, comma-separated, in column order (default: direct,auto,ebpf,userspace, plus
    /// haproxy,haproxy-splice,nginx with --with-peers).
    #[arg(long, value_enum, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Interleaved rounds; the report shows the median.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Also run HAProxy (`mode tcp`, and with splicing forced) and nginx (`stream {}`);
    /// installs them with apt-get if missing.
    #[arg(long)]
    with_peers: bool,
    /// Where the Markdown report goes (relative to the workspace root unless absolute).
    #[arg(long, default_value = "bench/results/latest.md")]
    out: PathBuf,
    /// Run in the current network namespace instead of a new one of its own (whose TCP
    /// counters, ports and TIME_WAIT sockets no other process on the machine touches).
    #[arg(long)]
    shared_netns: bool,
    /// Print the scenarios, targets and expected duration, and exit (nothing is built,
    /// installed or run; the upgrade scenario is counted as if the binary had the command).
    #[arg(long)]
    estimate: bool,
    /// Use this smartproxy binary instead of building one (`cargo build --release`).
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,

    /// Bytes per bulk run (each direction), split evenly over its streams.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    bulk_bytes: u64,
    /// Request and response size of churn, idle and upgrade exchanges (request/response
    /// scenarios carry their own: 64 B, 16 KiB and 256 KiB).
    #[arg(long, default_value = "64", value_parser = parse_bytes)]
    message_size: u64,
    /// Seconds of each request/response run.
    #[arg(long, default_value_t = 3)]
    rr_secs: u64,
    /// Seconds of each connection churn run.
    #[arg(long, default_value_t = 3)]
    churn_secs: u64,
    /// Connections in flight at once during churn.
    #[arg(long, default_value_t = 16)]
    churn_concurrency: usize,
    /// Idle connections held open.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// Bytes the backend offers the slow reader.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    slow_bytes: u64,
    /// The slow reader's rate, bytes per second.
    #[arg(long, default_value = "10MiB", value_parser = parse_bytes)]
    slow_rate: u64,
    /// Seconds the slow reader reads.
    #[arg(long, default_value_t = 20)]
    slow_secs: u64,
    /// Live connections during the upgrade scenario (streaming ones included).
    #[arg(long, default_value_t = 10_000)]
    upgrade_conns: usize,
    /// Of those, clients reading a never-ending download at full speed.
    #[arg(long, default_value_t = 8)]
    upgrade_streams: usize,
    /// smartproxy's max_queued_bytes (its default: 16 MiB); the slow-reader target is 2 × this.
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    max_queued: u64,
}

pub fn run(opts: Options) -> Result<ExitCode> {
    if cfg!(debug_assertions) && std::env::var_os(REEXEC_ENV).is_none() {
        return reexec_in_release();
    }
    ensure!(opts.runs >= 1, "--runs must be at least 1");
    ensure!(
        opts.churn_concurrency >= 1 && opts.idle_conns >= 1 && opts.upgrade_conns >= 1,
        "--churn-concurrency, --idle-conns and --upgrade-conns must be at least 1"
    );
    ensure!(
        (1..=wire::MAX_ECHO).contains(&opts.message_size),
        "--message-size must be 1 B to {}",
        show_bytes(wire::MAX_ECHO)
    );
    let root = run::workspace_root();
    let explicit = !opts.scenarios.is_empty();
    let (mut scenarios, targets) = selection(&opts)?;
    let mut params = params(&opts);

    if opts.estimate {
        let plan = estimate::Plan::new(&scenarios, &targets, opts.runs, &params);
        let names: Vec<String> = scenarios.iter().map(|s| s.slug()).collect();
        let columns: Vec<&str> = targets.iter().map(|t| t.name()).collect();
        println!(
            "xtask: bench: scenarios {}; targets {}; {} run(s): expected about {}",
            names.join(","),
            columns.join(","),
            opts.runs,
            plan.show()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if targets.iter().any(|t| t.is_haproxy()) {
        target::ensure_haproxy()?;
    }
    let nginx = if targets.contains(&Target::Nginx) {
        Some(nginx::ensure()?)
    } else {
        None
    };
    let smartproxy = match &opts.proxy_bin {
        Some(path) => Some(run::given_binary(root, path)?),
        None if targets.iter().any(|t| t.is_smartproxy()) => Some(run::build_release_binary(root)?),
        None => None,
    };
    let mut notes = Vec::new();
    if scenarios.contains(&Scenario::Upgrade) && !explicit {
        // Issue 15's subcommand may not exist yet: without it the scenario could only fail.
        match &smartproxy {
            Some(binary) if !has_upgrade(binary)? => {
                let note = format!(
                    "upgrade scenario skipped: {} has no `upgrade` subcommand (issue 15); \
                     `--scenarios upgrade` runs it anyway and fails",
                    binary.display()
                );
                println!("xtask: bench: {note}");
                notes.push(note);
                scenarios.retain(|s| *s != Scenario::Upgrade);
            }
            _ => {}
        }
    }
    if !opts.shared_netns {
        // After the builds and the installs (they may need the network), before any thread
        // starts.
        system::enter_own_netns()?;
        println!("xtask: bench: running in a network namespace of its own");
        let note = system::shorten_time_wait_reuse()?;
        println!("xtask: bench: {note}");
        notes.push(note);
    }
    notes.insert(
        0,
        if opts.shared_netns {
            "in the machine's network namespace (--shared-netns), with its \
             net.ipv4.tcp_tw_reuse_delay (at the default 1 s, client-first churn stops near \
             14k conn/s whatever the target)"
                .to_owned()
        } else {
            "in a network namespace of its own".to_owned()
        },
    );
    let fd_limit = raise_fd_limit(&scenarios, &mut params, &mut notes)?;
    let plan = estimate::Plan::new(&scenarios, &targets, opts.runs, &params);
    println!(
        "xtask: bench: {} scenario(s) × {} target(s) × {} run(s): expected about {} \
         (the estimate assumes 2 cores)",
        scenarios.len(),
        targets.len(),
        opts.runs,
        plan.show()
    );
    let began = Instant::now();
    let machine = Machine::detect(root)?;
    let backend = Backend::start()?;
    let launch = Launch {
        smartproxy: smartproxy.as_deref(),
        backend: backend.addr(),
        limits: config::Limits {
            connections: scenarios
                .iter()
                .map(|s| s.connections(&params))
                .max()
                .unwrap_or(1),
            fd_limit,
        },
        max_queued: opts.max_queued,
        nginx: nginx.as_ref(),
    };
    let backend_sent = backend.sent();

    let mut results = Results::default();
    for &scenario in &scenarios {
        let applicable: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|t| scenario.applies_to(*t))
            .collect();
        for (index, round) in (1..=opts.runs).enumerate() {
            // Each round starts one target further: what a run leaves behind (TIME_WAIT
            // sockets above all) weighs on the next, and no target always follows the same.
            let start = index % applicable.len().max(1);
            for &target in applicable[start..].iter().chain(&applicable[..start]) {
                let tag = format!("[{scenario} {round}/{}] {target}", opts.runs);
                let started = Instant::now();
                match run_one(scenario, target, &launch, &backend_sent, &params) {
                    Ok(m) => {
                        println!(
                            "xtask: bench: {tag} ({:.1} s): {}",
                            started.elapsed().as_secs_f64(),
                            summary(&m)
                        );
                        results.record(scenario, target, m);
                    }
                    Err(e) => {
                        eprintln!("xtask: bench: {tag} FAILED: {e:#}");
                        results.fail(format!("{tag}: {e:#}"));
                    }
                }
            }
        }
    }
    drop(backend);
    println!(
        "xtask: bench: the runs took {} (estimated {})",
        estimate::show_secs(began.elapsed().as_secs_f64()),
        plan.show()
    );

    let mut settings = settings(&params, &opts);
    for note in &notes {
        settings.push_str("; ");
        settings.push_str(note);
    }
    let text = report::render(
        &report::Context {
            machine: &machine,
            settings: &settings,
            scenarios: &scenarios,
            targets: &targets,
            runs: opts.runs,
            max_queued: opts.max_queued,
        },
        &results,
    );
    println!("\n{text}");
    let out = root.join(&opts.out);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    fs::write(&out, &text).with_context(|| format!("failed to write {}", out.display()))?;
    println!("xtask: bench: wrote {}", out.display());
    if results.failures().is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "xtask: bench: {} run(s) failed (listed in the report)",
            results.failures().len()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The scenarios and targets `opts` select: `--scenarios`, `--all` or the default subset;
/// `--targets`, or the default ones (with the peers after them for `--with-peers`).
fn selection(opts: &Options) -> Result<(Vec<Scenario>, Vec<Target>)> {
    let scenarios = if !opts.scenarios.is_empty() {
        Scenario::resolve(&opts.scenarios).map_err(|e| anyhow!("--scenarios: {e}"))?
    } else if opts.all {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL
            .into_iter()
            .filter(|s| s.is_default())
            .collect()
    };
    let targets = if !opts.targets.is_empty() {
        dedup(opts.targets.clone())
    } else if opts.with_peers {
        Target::DEFAULT.into_iter().chain(Target::PEERS).collect()
    } else {
        Target::DEFAULT.to_vec()
    };
    Ok((scenarios, targets))
}

/// The scenarios' sizes and durations from the command line.
fn params(opts: &Options) -> Params {
    Params {
        bulk_bytes: opts.bulk_bytes,
        message: opts.message_size,
        rr_secs: opts.rr_secs,
        churn_secs: opts.churn_secs,
        churn_concurrency: opts.churn_concurrency,
        idle_conns: opts.idle_conns,
        slow_bytes: opts.slow_bytes,
        slow_rate: opts.slow_rate,
        slow_secs: opts.slow_secs,
        upgrade_conns: opts.upgrade_conns,
        upgrade_streams: opts.upgrade_streams,
    }
}

/// Whether `smartproxy --help` lists an `upgrade` subcommand.
fn has_upgrade(binary: &std::path::Path) -> Result<bool> {
    let help = toolchain::output(Command::new(binary).arg("--help"))
        .with_context(|| format!("`{} --help` failed", binary.display()))?;
    Ok(help
        .lines()
        .any(|l| l.split_whitespace().next() == Some("upgrade")))
}

/// Raises RLIMIT_NOFILE for this process and the proxies it starts, and lowers the idle and
/// upgrade connection counts to what the limit allows (saying so in `notes`). Returns the
/// limit.
///
/// This process holds the client and the backend end of every held connection, and a proxy
/// (which inherits the limit) its two sockets: two descriptors per connection each, plus a few
/// the runtime, the maps and the logs take.
fn raise_fd_limit(
    scenarios: &[Scenario],
    params: &mut Params,
    notes: &mut Vec<String>,
) -> Result<u64> {
    let held = scenarios
        .iter()
        .map(|s| s.connections(params))
        .max()
        .unwrap_or(0) as u64;
    let want = (2 * held + FD_RESERVE).max(4 * FD_RESERVE);
    let fd_limit = system::raise_nofile(want)?;
    println!("xtask: bench: RLIMIT_NOFILE {fd_limit} (inherited by the proxies)");
    let fit = usize::try_from(fd_limit.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
    for (held_by, what, count) in [
        (
            &Scenario::HOLDING_IDLE_CONNS[..],
            "idle",
            &mut params.idle_conns,
        ),
        (
            &[Scenario::Upgrade][..],
            "upgrade",
            &mut params.upgrade_conns,
        ),
    ] {
        if held_by.iter().any(|s| scenarios.contains(s)) && fit < *count {
            let note = format!(
                "{what} connections lowered from {count} to {fit}: RLIMIT_NOFILE is {fd_limit} \
                 and this process may not raise its hard limit (no CAP_SYS_RESOURCE)"
            );
            eprintln!("xtask: bench: {note}");
            *count = fit;
            notes.push(note);
        }
    }
    Ok(fd_limit)
}

/// One scenario against one freshly started target; the target is stopped afterwards.
fn run_one(
    scenario: Scenario,
    target: Target,
    launch: &Launch<'_>,
    backend_sent: &Arc<AtomicU64>,
    params: &Params,
) -> Result<Measurement> {
    let mut running = Running::start(target, launch)?;
    let tcp = system::TcpCounters::read()?;
    let successor = Cell::new(None);
    let env = Env {
        addr: running.addr(),
        proxy_pid: running.pid(),
        backend_sent: Arc::clone(backend_sent),
        params,
        smartproxy: launch.smartproxy,
        control: running.control(),
        successor: &successor,
    };
    let outcome = scenario::run(scenario, &env);
    if let Some(pid) = successor.get() {
        running.handed_over(pid);
    }
    let mut m = outcome?;
    // Final byte counters need every connection gone from the proxy.
    let stats = running.wait_idle(Duration::from_secs(5))?;
    let tcp = system::TcpCounters::read()?.since(tcp);
    m.set(Metric::WinProbes, tcp.win_probes as f64);
    m.set(Metric::RtoTimeouts, tcp.rto_timeouts as f64);
    m.set(Metric::Retransmits, tcp.retransmits as f64);
    if matches!(running.target(), Target::Auto | Target::Ebpf) {
        match stats.as_ref().and_then(kernel_share) {
            Some(share) => m.set(Metric::KernelShare, share),
            None => m.set_unavailable(Metric::KernelShare),
        }
    }
    if running.target() == Target::Auto {
        match stats.as_ref() {
            Some(stats) => m.set(Metric::DataPathMoves, data_path_moves(stats) as f64),
            None => m.set_unavailable(Metric::DataPathMoves),
        }
    }
    running.stop()?;
    Ok(m)
}

/// Percent of the proxied bytes the kernel moved, if the proxy reports it.
fn kernel_share(stats: &serde_json::Value) -> Option<f64> {
    let get = |key: &str| {
        stats
            .pointer(&format!("/bytes/{key}"))
            .and_then(serde_json::Value::as_u64)
    };
    let kernel = get("kernel_client_to_backend")? + get("kernel_backend_to_client")?;
    let total = get("client_to_backend")? + get("backend_to_client")?;
    (total > 0).then(|| 100.0 * kernel as f64 / total as f64)
}

/// The adaptive path's moves (`ebpf.moves_to_kernel` + `ebpf.moves_to_relay`); a key the
/// proxy does not report (a build from before the adaptive path) counts as 0.
fn data_path_moves(stats: &serde_json::Value) -> u64 {
    ["moves_to_kernel", "moves_to_relay"]
        .into_iter()
        .map(|key| {
            stats
                .pointer(&format!("/ebpf/{key}"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        })
        .sum()
}

fn summary(m: &Measurement) -> String {
    m.metrics()
        .map(|metric| match m.get(metric).flatten() {
            Some(v) => format!("{} {}", metric.label(), show_number(v)),
            None => format!("{} n/a", metric.label()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn settings(p: &Params, opts: &Options) -> String {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "`cargo xtask {}`: bulk {} per run, split over its streams; request/response {} s \
         per run; churn {} at once for {} s, {} B echo; idle {} conns; slow reader {} \
         offered, read at {}/s for {} s; upgrade with {} conns ({} streaming); smartproxy \
         max_queued_bytes {}",
        args.join(" "),
        show_bytes(p.bulk_bytes),
        p.rr_secs,
        p.churn_concurrency,
        p.churn_secs,
        p.message,
        p.idle_conns,
        show_bytes(p.slow_bytes),
        show_bytes(p.slow_rate),
        p.slow_secs,
        p.upgrade_conns,
        p.upgrade_streams.min(p.upgrade_conns),
        show_bytes(opts.max_queued),
    )
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Builds xtask in release and replaces this process with it, same arguments.
fn reexec_in_release() -> Result<ExitCode> {
    let root = run::workspace_root();
    let cargo = run::cargo();
    println!(
        "xtask: bench: building xtask in release (the load generator must not be a debug build)"
    );
    toolchain::status(Command::new(&cargo).current_dir(root).args([
        "build",
        "--release",
        "--package",
        "xtask",
    ]))?;
    let binary = run::target_dir(&cargo, root)?.join("release").join("xtask");
    let mut cmd = Command::new(&binary);
    cmd.args(std::env::args_os().skip(1)).env(REEXEC_ENV, "1");
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to exec {cmd:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `cargo xtask bench ARGS --estimate` plans: scenarios, targets, seconds.
    fn plan(args: &[&str]) -> (Vec<Scenario>, Vec<Target>, f64) {
        let opts = Options::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("valid arguments");
        let (scenarios, targets) = selection(&opts).expect("a valid selection");
        let secs = estimate::Plan::new(&scenarios, &targets, opts.runs, &params(&opts)).secs();
        (scenarios, targets, secs)
    }

    #[test]
    fn the_default_run_leads_with_auto_and_fits_15_minutes() {
        let (scenarios, targets, secs) = plan(&["--with-peers"]);
        assert_eq!(
            targets,
            [
                Target::Direct,
                Target::Auto,
                Target::Ebpf,
                Target::Userspace,
                Target::Haproxy,
                Target::HaproxySplice,
                Target::Nginx
            ]
        );
        assert!(scenarios.contains(&Scenario::Upgrade));
        assert!(secs <= 15.0 * 60.0, "{}", estimate::show_secs(secs));
        // Without the peers: the smartproxy paths only.
        let (_, targets, _) = plan(&[]);
        assert_eq!(targets, Target::DEFAULT);
        let (_, targets, _) = plan(&["--targets", "auto,direct,auto"]);
        assert_eq!(targets, [Target::Auto, Target::Direct]);
    }

    #[test]
    fn bulk_both_ways_is_a_family_of_its_own_outside_the_default_run() {
        let duplex = [1, 4].map(|streams| Scenario::Bulk {
            direction: scenario::Direction::BothWays,
            streams,
        });
        let (chosen, _, _) = plan(&["--scenarios", "bulk-duplex"]);
        assert_eq!(chosen, duplex);
        let (default, _, _) = plan(&[]);
        assert!(duplex.iter().all(|s| !default.contains(s)));
        let (all, _, _) = plan(&["--all"]);
        assert!(duplex.iter().all(|s| all.contains(s)));
    }

    #[test]
    fn every_request_response_message_fits_the_backend() {
        for scenario in Scenario::ALL {
            if let Scenario::Rr { size, .. } = scenario {
                assert!((1..=wire::MAX_ECHO).contains(&size), "{scenario}");
            }
        }
    }

    #[test]
    fn auto_takes_part_in_the_upgrade_scenario() {
        assert!(Scenario::Upgrade.applies_to(Target::Auto));
        assert!(!Scenario::Upgrade.applies_to(Target::Nginx));
    }

    #[test]
    fn moves_are_read_from_the_stats_and_default_to_zero() {
        let stats = serde_json::json!({
            "ebpf": { "moves_to_kernel": 5, "moves_to_relay": 2 },
            "bytes": {
                "client_to_backend": 300,
                "backend_to_client": 100,
                "kernel_client_to_backend": 200,
                "kernel_backend_to_client": 0
            }
        });
        assert_eq!(data_path_moves(&stats), 7);
        assert_eq!(kernel_share(&stats), Some(50.0));
        let before = serde_json::json!({ "ebpf": { "moves_to_kernel": 3 } });
        assert_eq!(data_path_moves(&before), 3);
        assert_eq!(data_path_moves(&serde_json::json!({})), 0);
        assert_eq!(kernel_share(&before), None);
    }
}
