//! The report: the machine it ran on, one median table per scenario family with ratios to
//! direct, the closed-loop check of the request/response latencies, the issues' targets (met
//! or not, with numbers), every run's values, and how each metric is measured.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context as _, Result};

use super::{
    metric::{Measurement, Metric},
    scenario::{idle, Closer, Direction, Family, Scenario},
    target::Target,
    units::{show_bytes, show_number, GIB, MIB},
};
use crate::toolchain;

/// The machine and checkout a report was made on.
pub struct Machine {
    kernel: String,
    cpu: String,
    cores: usize,
    ram: u64,
    date: String,
    commit: String,
    load: String,
}

impl Machine {
    pub fn detect(root: &Path) -> Result<Self> {
        let read =
            |path: &str| fs::read_to_string(path).with_context(|| format!("failed to read {path}"));
        let cpuinfo = read("/proc/cpuinfo")?;
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let ram = super::system::meminfo()?.total;
        let date = toolchain::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
        let commit = toolchain::output(Command::new("git").current_dir(root).args([
            "rev-parse",
            "--short=12",
            "HEAD",
        ]))?;
        let dirty = !toolchain::output(Command::new("git").current_dir(root).args([
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))?
        .trim()
        .is_empty();
        Ok(Self {
            kernel: read("/proc/sys/kernel/osrelease")?.trim().to_owned(),
            cpu,
            cores,
            ram,
            date: date.trim().to_owned(),
            commit: format!(
                "{}{}",
                commit.trim(),
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
            load: Self::load()?,
        })
    }

    fn load() -> Result<String> {
        let text = fs::read_to_string("/proc/loadavg").context("failed to read /proc/loadavg")?;
        Ok(text
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// Every run's measurement, and the runs that failed.
#[derive(Default)]
pub struct Results {
    runs: BTreeMap<(Scenario, Target), Vec<Measurement>>,
    failures: Vec<String>,
}

impl Results {
    pub fn record(&mut self, scenario: Scenario, target: Target, m: Measurement) {
        self.runs.entry((scenario, target)).or_default().push(m);
    }

    pub fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    fn runs(&self, scenario: Scenario, target: Target) -> &[Measurement] {
        self.runs
            .get(&(scenario, target))
            .map_or(&[], Vec::as_slice)
    }

    /// The rows of a scenario: every metric any target reported, in [`Metric`] order.
    fn metrics(&self, scenario: Scenario, targets: &[Target]) -> Vec<Metric> {
        let mut metrics: Vec<Metric> = targets
            .iter()
            .flat_map(|t| self.runs(scenario, *t))
            .flat_map(Measurement::metrics)
            .collect();
        metrics.sort_unstable();
        metrics.dedup();
        metrics
    }

    /// The median over a target's runs: absent if no run has the metric, `Some(None)` (n/a)
    /// if any run could not read it.
    fn median(&self, scenario: Scenario, target: Target, metric: Metric) -> Option<Option<f64>> {
        let values: Vec<Option<f64>> = self
            .runs(scenario, target)
            .iter()
            .filter_map(|m| m.get(metric))
            .collect();
        if values.is_empty() {
            return None;
        }
        let Some(mut numbers) = values.into_iter().collect::<Option<Vec<f64>>>() else {
            return Some(None);
        };
        numbers.sort_by(f64::total_cmp);
        let mid = numbers.len() / 2;
        Some(Some(if numbers.len() % 2 == 1 {
            numbers[mid]
        } else {
            (numbers[mid - 1] + numbers[mid]) / 2.0
        }))
    }

    fn value(&self, scenario: Scenario, target: Target, metric: Metric) -> Option<f64> {
        self.median(scenario, target, metric).flatten()
    }
}

/// What the report needs besides the results.
pub struct Context<'a> {
    pub machine: &'a Machine,
    pub settings: &'a str,
    pub scenarios: &'a [Scenario],
    pub targets: &'a [Target],
    pub runs: u32,
    /// The proxy's `max_queued_bytes`, for the slow-reader target.
    pub max_queued: u64,
}

pub fn render(cx: &Context<'_>, results: &Results) -> String {
    let mut out = String::new();
    let m = cx.machine;
    let _ = writeln!(out, "# smartproxy benchmark\n");
    let _ = writeln!(
        out,
        "- machine: {} ({} cores), {} RAM, Linux {}",
        m.cpu,
        m.cores,
        show_gib(m.ram),
        m.kernel
    );
    let _ = writeln!(out, "- date: {}; commit {}", m.date, m.commit);
    let _ = writeln!(
        out,
        "- load average at start: {}; at end: {}",
        m.load,
        Machine::load().unwrap_or_else(|e| format!("unknown ({e})"))
    );
    let _ = writeln!(out, "- settings: {}", cx.settings);
    let _ = writeln!(
        out,
        "- median of {} interleaved run(s); a proxy's cell is `value (ratio to direct)`",
        cx.runs
    );
    tables(&mut out, cx, results, Cell::Median);
    if cx.scenarios.iter().any(|s| s.family() == Family::Rr) {
        let _ = writeln!(out, "\n## Closed-loop check (request/response)\n");
        closed_loop(&mut out, cx, results);
    }
    let _ = writeln!(out, "\n## Targets (issues 14 and 4)\n");
    targets(&mut out, cx, results);
    if !results.failures.is_empty() {
        let _ = writeln!(out, "\n## Failed runs\n");
        for f in &results.failures {
            let _ = writeln!(out, "- {}", f.replace('\n', " "));
        }
    }
    if cx.runs > 1 {
        let _ = writeln!(out, "\n## Every run");
        tables(&mut out, cx, results, Cell::AllRuns);
    }
    let _ = writeln!(out, "\n## How it is measured\n");
    out.push_str(METHOD);
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    Median,
    AllRuns,
}

/// One table per scenario family that ran, each under a heading.
fn tables(out: &mut String, cx: &Context<'_>, results: &Results, cell: Cell) {
    let mut families: Vec<Family> = cx.scenarios.iter().map(|s| s.family()).collect();
    families.dedup();
    for family in families {
        let _ = writeln!(out, "\n### {}\n", family.title());
        table(out, cx, results, cell, family);
    }
}

fn table(out: &mut String, cx: &Context<'_>, results: &Results, cell: Cell, family: Family) {
    let mut header = String::from("| scenario | metric |");
    let mut rule = String::from("| --- | --- |");
    for t in cx.targets {
        if *t == Target::Direct || cell == Cell::AllRuns {
            let _ = write!(header, " {t} |");
        } else {
            let _ = write!(header, " {t} (ratio) |");
        }
        rule.push_str(" ---: |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for &scenario in cx.scenarios.iter().filter(|s| s.family() == family) {
        for (row, metric) in results
            .metrics(scenario, cx.targets)
            .into_iter()
            .enumerate()
        {
            let name = if row == 0 {
                scenario.title()
            } else {
                String::new()
            };
            let _ = write!(out, "| {name} | {} |", metric.label());
            let direct = results.value(scenario, Target::Direct, metric);
            for &target in cx.targets {
                let text = match cell {
                    Cell::Median => median_cell(results, scenario, target, metric, direct),
                    Cell::AllRuns => runs_cell(results, scenario, target, metric),
                };
                let _ = write!(out, " {text} |");
            }
            let _ = writeln!(out);
        }
    }
}

fn median_cell(
    results: &Results,
    scenario: Scenario,
    target: Target,
    metric: Metric,
    direct: Option<f64>,
) -> String {
    match results.median(scenario, target, metric) {
        None => "—".to_owned(),
        Some(None) => "n/a".to_owned(),
        Some(Some(v)) => match direct {
            Some(d) if target != Target::Direct && d != 0.0 && metric.has_ratio() => {
                format!("{} ({:.2}×)", show_number(v), v / d)
            }
            _ => show_number(v),
        },
    }
}

fn runs_cell(results: &Results, scenario: Scenario, target: Target, metric: Metric) -> String {
    let values: Vec<String> = results
        .runs(scenario, target)
        .iter()
        .map(|m| match m.get(metric) {
            None => "—".to_owned(),
            Some(None) => "n/a".to_owned(),
            Some(Some(v)) => show_number(v),
        })
        .collect();
    if values.iter().all(|v| v == "—") {
        "—".to_owned()
    } else {
        values.join(" / ")
    }
}

impl Metric {
    /// A ratio to direct says something for rates, latencies, CPU and exact memory figures;
    /// not for counts of events, shares, or machine-wide memory figures that are near zero
    /// and noisy for direct.
    fn has_ratio(self) -> bool {
        !matches!(
            self,
            Metric::FailedConnections
                | Metric::Refused
                | Metric::Resets
                | Metric::HandoffMs
                | Metric::HandoffWallMs
                | Metric::UpgradeMoved
                | Metric::UpgradeLongestGap
                | Metric::UpgradeLost
                | Metric::UpgradeFailedConnects
                | Metric::UpgradeRefused
                | Metric::KernelShare
                | Metric::DataPathMoves
                | Metric::WinProbes
                | Metric::RtoTimeouts
                | Metric::Retransmits
                | Metric::LongestReadWait
                | Metric::LongestReadWaitAt
                | Metric::Delivered
                | Metric::SocketMemPerConn
                | Metric::PeakKernelMem
                | Metric::PeakSocketMem
        )
    }
}

/// Mean latency against connections / rate for every request/response row: in a closed loop
/// they are equal (Little's law); a row where they differ by more than 10 % is flagged.
fn closed_loop(out: &mut String, cx: &Context<'_>, results: &Results) {
    let _ = writeln!(
        out,
        "| scenario | target | mean latency (µs) | connections / rate (µs) | difference | \
         check |\n| --- | --- | ---: | ---: | ---: | --- |"
    );
    for &scenario in cx.scenarios.iter().filter(|s| s.family() == Family::Rr) {
        for &target in cx.targets {
            let mean = results.value(scenario, target, Metric::LatencyMean);
            let little = results.value(scenario, target, Metric::ConnsOverRate);
            let (diff, check) = match (mean, little) {
                (Some(m), Some(l)) if l > 0.0 => {
                    let d = (m - l) / l * 100.0;
                    let check = if d.abs() > 10.0 {
                        "**differs by more than 10 %**"
                    } else {
                        "ok"
                    };
                    (format!("{d:+.1} %"), check)
                }
                _ => ("n/a".to_owned(), "not measured"),
            };
            let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), show_number);
            let _ = writeln!(
                out,
                "| {} | {target} | {} | {} | {diff} | {check} |",
                scenario.title(),
                show(mean),
                show(little)
            );
        }
    }
}

/// One line per target of issue 14 (and issue 4's slow reader), for each of smartproxy's data
/// paths: auto (the default, adaptive per connection), ebpf and userspace.
fn targets(out: &mut String, cx: &Context<'_>, results: &Results) {
    let has = |s: Scenario, t: Target| cx.scenarios.contains(&s) && cx.targets.contains(&t);
    let v = |s: Scenario, t: Target, m: Metric| results.value(s, t, m);
    let fmt = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), show_number);
    let mut lines: Vec<(String, Verdict, String)> = Vec::new();
    let paths = [Target::Auto, Target::Ebpf, Target::Userspace];

    // Ratios to direct.
    let ratio_targets: Vec<(String, Scenario, Metric, f64, &str)> = vec![
        (
            "bulk upload, 1 stream ≥ 0.75 × direct".to_owned(),
            Scenario::Bulk {
                direction: Direction::Upload,
                streams: 1,
            },
            Metric::Throughput,
            0.75,
            "Gbit/s",
        ),
        (
            "bulk download, 1 stream ≥ 0.75 × direct".to_owned(),
            Scenario::Bulk {
                direction: Direction::Download,
                streams: 1,
            },
            Metric::Throughput,
            0.75,
            "Gbit/s",
        ),
        (
            "request/response, 32 conns × 64 B ≥ 0.6 × direct".to_owned(),
            Scenario::Rr {
                conns: 32,
                size: 64,
            },
            Metric::RequestsPerSec,
            0.6,
            "req/s",
        ),
        (
            "churn, client closes first ≥ 0.6 × direct with 0 failed".to_owned(),
            Scenario::Churn {
                closer: Closer::Client,
            },
            Metric::ConnectionsPerSec,
            0.6,
            "conn/s",
        ),
        (
            "churn, server closes first ≥ 0.6 × direct with 0 failed".to_owned(),
            Scenario::Churn {
                closer: Closer::Server,
            },
            Metric::ConnectionsPerSec,
            0.6,
            "conn/s",
        ),
    ];
    for (what, s, metric, min, unit) in ratio_targets {
        for t in paths {
            let what = format!("{t}: {what}");
            if !(has(s, t) && has(s, Target::Direct)) {
                lines.push((
                    what,
                    Verdict::NotMeasured,
                    format!("needs {s} with direct and {t}"),
                ));
                continue;
            }
            let x = v(s, t, metric);
            let d = v(s, Target::Direct, metric);
            let ratio = x.zip(d).filter(|(_, d)| *d > 0.0).map(|(x, d)| x / d);
            let failed = (s.family() == Family::Churn)
                .then(|| v(s, t, Metric::FailedConnections))
                .flatten();
            let met = ratio.map(|r| r >= min && failed.is_none_or(|f| f == 0.0));
            let mut numbers = format!(
                "{} vs {} {unit} = {}×",
                fmt(x),
                fmt(d),
                ratio.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}"))
            );
            if let Some(f) = failed {
                let _ = write!(numbers, ", {} failed", show_number(f));
            }
            lines.push((what, Verdict::from(met), numbers));
        }
    }

    // Context switches per request: the paths that use the kernel (auto may) no higher than
    // the userspace relay.
    let s = Scenario::Rr {
        conns: 32,
        size: 64,
    };
    for t in [Target::Auto, Target::Ebpf] {
        let what =
            format!("{t}: context switches per request no higher than userspace (32 conns × 64 B)");
        if has(s, t) && has(s, Target::Userspace) {
            let x = v(s, t, Metric::CtxPerRequest);
            let u = v(s, Target::Userspace, Metric::CtxPerRequest);
            lines.push((
                what,
                Verdict::from(x.zip(u).map(|(x, u)| x <= u)),
                format!("{} vs {}", fmt(x), fmt(u)),
            ));
        } else {
            lines.push((
                what,
                Verdict::NotMeasured,
                format!("needs rr-32x64 with {t} and userspace"),
            ));
        }
    }

    // Idle RSS, at both readings.
    for t in paths {
        for scenario in Scenario::IDLE {
            for (metric, when) in [
                (Metric::ProxyRssPerConn, idle::SETTLE),
                (Metric::ProxyRssPerConnSettled, idle::SETTLED),
            ] {
                let what = format!(
                    "{t}: ≤ 1 KiB proxy RSS per idle connection, {}, read {} s after the last",
                    scenario.title(),
                    when.as_secs()
                );
                if has(scenario, t) {
                    let x = v(scenario, t, metric);
                    lines.push((
                        what,
                        Verdict::from(x.map(|x| x <= 1.0)),
                        format!("{} KiB", fmt(x)),
                    ));
                } else {
                    let needs = format!("needs the {} scenario", scenario.slug());
                    lines.push((what, Verdict::NotMeasured, needs));
                }
            }
        }
    }

    // Slow reader (issue 4): what a path that may use the kernel holds beyond what direct
    // holds.
    let cap = 2 * cx.max_queued;
    for t in [Target::Auto, Target::Ebpf] {
        let what = format!(
            "{t}: slow reader, the proxy holds ≤ 2 × max_queued_bytes = {} per connection \
             (issue 4)",
            show_bytes(cap)
        );
        if has(Scenario::SlowReader, t) && has(Scenario::SlowReader, Target::Direct) {
            let x = v(Scenario::SlowReader, t, Metric::PeakInFlight);
            let d = v(Scenario::SlowReader, Target::Direct, Metric::PeakInFlight);
            let added = x.zip(d).map(|(x, d)| x - d);
            lines.push((
                what,
                Verdict::from(added.map(|a| a * MIB as f64 <= cap as f64)),
                format!(
                    "peak bytes in flight: {t} {} MiB, direct {} MiB (the client's and \
                     backend's own buffers): the proxy holds {} MiB",
                    fmt(x),
                    fmt(d),
                    fmt(added)
                ),
            ));
        } else {
            lines.push((
                what,
                Verdict::NotMeasured,
                format!("needs slow-reader with direct and {t}"),
            ));
        }
    }

    for (what, verdict, numbers) in lines {
        let _ = writeln!(out, "- {what}: **{}** — {numbers}", verdict.word());
    }
}

enum Verdict {
    Met,
    NotMet,
    /// Measured, but a number is missing (n/a).
    Unknown,
    NotMeasured,
}

impl Verdict {
    fn from(met: Option<bool>) -> Self {
        match met {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::NotMet,
            None => Verdict::Unknown,
        }
    }

    fn word(&self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "not met",
            Verdict::Unknown => "unknown",
            Verdict::NotMeasured => "not measured",
        }
    }
}

fn show_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

const METHOD: &str = "\
Everything runs on 127.0.0.1. The load generator and the backend are threads of the xtask \
process (built in release); the proxies are child processes with generated configs. Rounds \
are interleaved: every round runs each target once, in the column order, each round starting \
one column further (a run's TIME_WAIT sockets weigh on the next one).

- **throughput**: bytes × 8 / wall time, from before connect until the last byte is read \
(upload: until the backend's reply that it has read up to EOF).
- **proxy CPU**: utime + stime of the proxy process (/proc/PID/stat) over the transfer. \
**machine CPU**: user + nice + system + irq + softirq + steal of /proc/stat over the same \
window, including the load generator and backend (direct shows their share). The kernel \
path's work is softirq, charged to no process, so the machine figure is the fair comparison.
- **request/response**: a closed loop: every connection always has one request outstanding. \
The connections are tasks on one single-threaded tokio runtime per core (not a blocking \
thread each: 32 or 256 threads on 2 cores ran in scheduler bursts, which gave a median far \
below the mean). A sample runs from just before the request's write until the task has the \
last response byte, and the next request follows at once, so the mean latency must equal \
connections / rate (Little's law); both are printed and the closed-loop check flags a row \
where they differ by more than 10 %. Percentiles are nearest-rank over every sample. \
TCP_NODELAY on client and backend. **longest read wait** here is the largest sample.
- **context switches**: the `ctxt` line of /proc/stat (every CPU, every process and kernel \
thread: the machine-wide count), read before and after the measured window. Bulk: from \
before the first connect to the last byte of the last stream, per GiB moved. \
Request/response: from the common start of the loop until every connection has its last \
response, per completed request. Churn: from before the threads start until they have all \
finished, per connection attempted. The load generator's and backend's switches are in \
it: direct shows their share.
- **connection churn**: connect, one echo, close; a sample is connect start to close. Client \
first: the client closes right after the echo. Server first: the backend closes after its \
reply and the client closes once it has read that EOF. **failed connections**: attempts that \
failed, of which **refused** (ECONNREFUSED) and **reset** (ECONNRESET, EPIPE); the rest are \
early EOFs and timeouts.
- **bulk**: --bulk-bytes per run, split evenly over 1, 4 or 16 parallel connections; both \
ways (1 or 4), --bulk-bytes each way at once, the window ending once the client has read \
the backend's bytes and its count of the client's, the throughput and per-GiB figures \
counting both directions together and the longest read wait the longer of the two ends'; proxy CPU and RSS are summed over the proxy's processes (nginx's \
master and workers).
- **upgrade**: `smartproxy upgrade --control PATH --json` with --upgrade-conns connections \
open, --upgrade-streams of them reading an endless download at full speed, and one thread \
connecting, echoing and closing in a loop. **handoff**: `elapsed_ms` of the command's JSON, \
and its wall time. **longest gap**: the longest time between two reads of any streaming \
client, from 1 s after the streams started until 2 s after the command exited. **lost**: \
idle connections whose echo round trip failed after the upgrade, and streams that ended. \
**connects failed**: the loop's failures over the same window.
- **idle**: growth over the idle connections divided by their number: proxy VmRSS \
(/proc/PID/status), 1 s after the last connection and again 8 s after it (smartproxy \
parks a connection after 1 s of quiet, at most 1,024 per sweep of 0.5 s); kernel slab (Slab of /proc/meminfo); socket buffers (TCP mem of \
/proc/net/sockstat). Kernel figures are machine-wide and include the client's and \
backend's sockets, which direct shows alone.
- **heartbeat**: --idle-conns echo connections opened one after another; then one thread \
sends each a --message-size echo every 5 s, spread evenly over the period, and reads the \
reply. After a warm-up of four periods, a window of 5 s is measured: **heartbeats/s** \
(connections / 5 s while the load generator keeps up; less means it fell behind), proxy \
and machine CPU (proxy CPU is counted in 10 ms ticks: about 1 µs per heartbeat with \
9,872 connections) and machine-wide context switches per heartbeat, the p50 and p99 of \
the round trips, and \
proxy VmRSS growth per connection at the end of the window. smartproxy parks a connection \
after 1 s of quiet, and one that traffic takes up soon after parks later each time (2, 4, \
then 8 s): the warm-up covers that, with a period to spare for connections the sweep had \
not yet asked to park when the first heartbeats came.
- **slow reader**: sampled every 100 ms, peak above the value at the start. **bytes in \
flight**: bytes the backend's write() calls handed to the kernel minus bytes the client has \
read: exact and for this connection only; they sit in socket buffers or between the proxy's \
sockets (for a userspace proxy, partly in its buffers). **kernel memory**: machine-wide \
MemTotal − MemFree − Buffers − Cached − AnonPages of /proc/meminfo (slab, and pages with \
no counter of their own, such as skbs queued between sockets that no socket is charged \
for); noisy when other work runs. **socket memory**: TCP mem of /proc/net/sockstat \
(memory charged to sockets, machine-wide). **delivered**: bytes the client read. The \
slow-reader targets compare auto's and ebpf's bytes in flight minus direct's (the client's \
and backend's own buffers) with 2 × max_queued_bytes.
- **auto**: smartproxy with `data_path = \"auto\"` (its default) and no `auto_*` key, so the \
adaptive path's defaults apply: a connection starts on the userspace relay and moves into \
the kernel when both directions reach `auto_splice_rate` within `auto_window`.
- **bytes through kernel** (ebpf and auto): smartproxy stats after the scenario: \
(bytes.kernel_client_to_backend + bytes.kernel_backend_to_client) / (bytes.client_to_backend \
+ bytes.backend_to_client); n/a when the proxy does not report the kernel keys.
- **data path moves** (auto only): smartproxy stats after the scenario: ebpf.moves_to_kernel \
+ ebpf.moves_to_relay, every connection of the run together (a key the proxy does not report \
counts as 0).
- **zero-window probes**, **RTO timeouts**, **retransmitted segments**: TcpExt TCPWinProbe \
(what `nstat -az TcpExtTCPWinProbe` prints) and TCPTimeouts of /proc/net/netstat, Tcp \
RetransSegs of /proc/net/snmp; difference over the scenario, in the bench's own network \
namespace (so no other traffic counts). On loopback nothing is lost unless a program drops \
it: a retransmission timeout is a stall of at least 200 ms (the minimum RTO).
- **longest read wait**: the longest a receiver sat in one read() before data arrived, at \
the client (at the backend for uploads, which reports it back). For a back-to-back reader \
this is the longest gap between reads; the slow reader's pacing sleeps are not counted. \
**after**: how many bytes the receiver had read before that wait (bulk only): where in the \
transfer the stall was.
- Memory and CPU figures are machine-wide: other work on the machine shows up in them.
";

#[cfg(test)]
mod tests {
    use super::*;

    /// The method's heartbeat line says what the scenario does.
    #[test]
    fn the_heartbeat_method_names_its_period_and_window() {
        use crate::bench::scenario::heartbeat::{EVERY, MEASURED, WARM_UP};
        assert!(METHOD.contains(&format!("echo every {} s", EVERY.as_secs())));
        assert!(METHOD.contains(&format!("connections / {} s", EVERY.as_secs())));
        assert!(METHOD.contains(&format!("window of {} s", MEASURED.as_secs())));
        assert_eq!(
            WARM_UP,
            4 * EVERY,
            "the method calls the warm-up four periods"
        );
    }

    #[test]
    fn auto_has_its_column_its_kernel_share_and_its_moves() {
        let bulk = Scenario::Bulk {
            direction: Direction::Download,
            streams: 1,
        };
        let rr = Scenario::Rr {
            conns: 32,
            size: 64,
        };
        let targets = [
            Target::Direct,
            Target::Auto,
            Target::Ebpf,
            Target::Userspace,
        ];
        let mut results = Results::default();
        for t in targets {
            let mut m = Measurement::default();
            m.set(Metric::Throughput, 10.0);
            match t {
                Target::Auto => {
                    m.set(Metric::KernelShare, 90.0);
                    m.set(Metric::DataPathMoves, 1.0);
                }
                Target::Ebpf => m.set(Metric::KernelShare, 95.0),
                _ => {}
            }
            results.record(bulk, t, m);
            let mut m = Measurement::default();
            m.set(Metric::LatencyMean, 100.0);
            m.set(Metric::ConnsOverRate, 101.0);
            results.record(rr, t, m);
        }
        let machine = Machine {
            kernel: "6.1".into(),
            cpu: "cpu".into(),
            cores: 2,
            ram: GIB,
            date: "today".into(),
            commit: "abc".into(),
            load: "0 0 0".into(),
        };
        let text = render(
            &Context {
                machine: &machine,
                settings: "test",
                scenarios: &[bulk, rr],
                targets: &targets,
                runs: 1,
                max_queued: 16 * MIB,
            },
            &results,
        );
        assert!(
            text.contains(
                "| scenario | metric | direct | auto (ratio) | ebpf (ratio) | userspace (ratio) |"
            ),
            "{text}"
        );
        assert!(
            text.contains("|  | bytes through kernel (%) | — | 90.0 | 95.0 | — |"),
            "{text}"
        );
        assert!(
            text.contains("|  | data path moves (to kernel + to relay) | — | 1.00 | — | — |"),
            "{text}"
        );
        assert!(
            text.contains("| 32 conns × 64 B | auto | 100 | 101 | -1.0 % | ok |"),
            "{text}"
        );
        assert!(
            text.contains("- auto: bulk download, 1 stream ≥ 0.75 × direct"),
            "{text}"
        );
    }
}
