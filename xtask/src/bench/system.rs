//! System metrics from /proc (CPU time, memory, TCP counters), the fd limit, and a sampler
//! that tracks peak memory while a scenario runs.

use std::{
    fs,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

fn read(path: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("failed to read {path}"))
}

fn sysconf(name: libc::c_int, fallback: i64) -> i64 {
    // SAFETY: sysconf only reads a system value; it has no memory-safety preconditions.
    let value: i64 = unsafe { libc::sysconf(name) };
    if value > 0 {
        value
    } else {
        fallback
    }
}

/// Clock ticks per second, the unit of /proc/stat and /proc/PID/stat times.
fn ticks_per_sec() -> f64 {
    sysconf(libc::_SC_CLK_TCK, 100) as f64
}

fn page_size() -> u64 {
    sysconf(libc::_SC_PAGESIZE, 4096).unsigned_abs()
}

/// CPU seconds the whole machine spent busy so far: user + nice + system + irq + softirq +
/// steal of the `cpu` line of /proc/stat (guest time is already inside user). The kernel data
/// path's work is softirq, which no process is charged for, so this is the fair total.
pub fn machine_busy_secs() -> Result<f64> {
    let text = read("/proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no aggregate \"cpu\" line"))?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("/proc/stat: unexpected cpu line {line:?}"))?;
    if fields.len() < 8 {
        bail!(
            "/proc/stat: cpu line has {} fields, expected 8 or more",
            fields.len()
        );
    }
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] =
        <[u64; 8]>::try_from(&fields[..8]).expect("the slice has exactly 8 elements");
    Ok((user + nice + system + irq + softirq + steal) as f64 / ticks_per_sec())
}

/// Context switches the whole machine has made since boot: the `ctxt` line of /proc/stat
/// (voluntary and involuntary, every CPU, kernel threads included).
pub fn context_switches() -> Result<u64> {
    let text = read("/proc/stat")?;
    text.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("/proc/stat has no numeric \"ctxt\" line"))
}

/// `pid` and every live descendant of it (nginx's master forks its workers), found through
/// the parent field of /proc/*/stat.
pub fn process_tree(pid: u32) -> Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc").context("failed to list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: skip it.
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let parent = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(parent) = parent {
            parents.push((child, parent));
        }
    }
    let mut tree = vec![pid];
    // Bounded: every pass adds at least one process or stops.
    loop {
        let before = tree.len();
        for &(child, parent) in &parents {
            if tree.contains(&parent) && !tree.contains(&child) {
                tree.push(child);
            }
        }
        if tree.len() == before {
            return Ok(tree);
        }
    }
}

/// [`process_cpu_secs`] summed over [`process_tree`].
pub fn tree_cpu_secs(pid: u32) -> Result<f64> {
    process_tree(pid)?
        .into_iter()
        .map(process_cpu_secs)
        .sum::<Result<f64>>()
}

/// [`rss_bytes`] summed over [`process_tree`] (pages shared between the processes count
/// once per process, as VmRSS does).
pub fn tree_rss_bytes(pid: u32) -> Result<u64> {
    process_tree(pid)?.into_iter().map(rss_bytes).sum()
}

/// utime + stime of process `pid` (all its threads) in seconds, from /proc/PID/stat.
pub fn process_cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name (field 2) is in parentheses and may hold spaces; count after it.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| anyhow!("{path}: no \")\" after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("{path}: field {} is missing or not a number", i + 3))
    };
    Ok((tick(11)? + tick(12)?) as f64 / ticks_per_sec())
}

/// Resident set size of process `pid` in bytes (`VmRSS` of /proc/PID/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    kib_field(&text, "VmRSS:").ok_or_else(|| anyhow!("{path} has no VmRSS line"))
}

/// A `Name:   123 kB` line of /proc/meminfo or /proc/PID/status, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The parts of /proc/meminfo the bench uses, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct MemInfo {
    pub total: u64,
    /// Memory neither free nor page cache nor process memory: MemTotal - MemFree - Buffers -
    /// Cached - AnonPages. Slab, kernel stacks, page tables, and pages the kernel allocates
    /// without a counter of their own, such as the data of skbs queued between sockets that no
    /// socket is charged for.
    pub kernel: u64,
    /// Slab (reclaimable + unreclaimable): struct sock, inodes, files, epoll items, psocks.
    pub slab: u64,
}

pub fn meminfo() -> Result<MemInfo> {
    let text = read("/proc/meminfo")?;
    let field = |name: &str| {
        kib_field(&text, name).ok_or_else(|| anyhow!("/proc/meminfo has no {name} line"))
    };
    let total = field("MemTotal:")?;
    let accounted =
        field("MemFree:")? + field("Buffers:")? + field("Cached:")? + field("AnonPages:")?;
    Ok(MemInfo {
        total,
        kernel: total.saturating_sub(accounted),
        slab: field("Slab:")?,
    })
}

/// Memory charged to TCP sockets in bytes: the `mem` pages of the `TCP:` line of
/// /proc/net/sockstat (the kernel's `tcp_memory_allocated`).
pub fn socket_mem_bytes() -> Result<u64> {
    let text = read("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| anyhow!("/proc/net/sockstat has no TCP line"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let pages: u64 = words
        .windows(2)
        .find(|w| w[0] == "mem")
        .and_then(|w| w[1].parse().ok())
        .ok_or_else(|| anyhow!("/proc/net/sockstat: no \"mem N\" in {line:?}"))?;
    Ok(pages * page_size())
}

/// TCP counters of this network namespace that show stalls.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCounters {
    /// Zero-window probes sent: `TcpExt: TCPWinProbe` of /proc/net/netstat (what `nstat -az
    /// TcpExtTCPWinProbe` prints). A receiver that stopped reading causes them.
    pub win_probes: u64,
    /// Retransmission timeouts: `TcpExt: TCPTimeouts`. On loopback nothing is lost unless a
    /// program drops it, so each is a stall of at least the minimum RTO (200 ms).
    pub rto_timeouts: u64,
    /// Segments retransmitted: `Tcp: RetransSegs` of /proc/net/snmp.
    pub retransmits: u64,
}

impl TcpCounters {
    pub fn read() -> Result<Self> {
        let netstat = read("/proc/net/netstat")?;
        let snmp = read("/proc/net/snmp")?;
        Ok(Self {
            win_probes: mib_value("/proc/net/netstat", &netstat, "TcpExt:", "TCPWinProbe")?,
            rto_timeouts: mib_value("/proc/net/netstat", &netstat, "TcpExt:", "TCPTimeouts")?,
            retransmits: mib_value("/proc/net/snmp", &snmp, "Tcp:", "RetransSegs")?,
        })
    }

    /// What happened since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            win_probes: self.win_probes.saturating_sub(earlier.win_probes),
            rto_timeouts: self.rto_timeouts.saturating_sub(earlier.rto_timeouts),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
        }
    }
}

/// One counter of a /proc/net/{snmp,netstat} file: pairs of lines, `Section: Name1 Name2 ...`
/// then `Section: 1 2 ...`.
fn mib_value(path: &str, text: &str, section: &str, name: &str) -> Result<u64> {
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with(section) {
            continue;
        }
        let index = names
            .split_whitespace()
            .position(|n| n == name)
            .ok_or_else(|| anyhow!("{path}: {section} has no {name}"))?;
        return values
            .split_whitespace()
            .nth(index)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{path}: {section} {name} has no value"));
    }
    bail!("{path} has no {section} section")
}

/// Raises RLIMIT_NOFILE of this process (and so of every child it spawns after) towards
/// `want`: to `want` if the hard limit allows it or this process may raise the hard limit
/// (CAP_SYS_RESOURCE), else to the hard limit. Returns the new soft limit.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE) failed");
    }
    if limit.rlim_cur >= want {
        return Ok(limit.rlim_cur);
    }
    let set = |soft: u64, hard: u64| {
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the valid struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            Ok(soft)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match set(want, limit.rlim_max.max(want)) {
        Ok(soft) => Ok(soft),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && limit.rlim_max > limit.rlim_cur => {
            set(limit.rlim_max, limit.rlim_max)
                .with_context(|| format!("setrlimit(RLIMIT_NOFILE, {}) failed", limit.rlim_max))
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(limit.rlim_cur),
        Err(e) => Err(e).with_context(|| format!("setrlimit(RLIMIT_NOFILE, {want}) failed")),
    }
}

/// Moves this process (its calling thread, and so every thread and child it starts after)
/// into a new network namespace with loopback up. TCP counters (/proc/net/netstat) are per
/// namespace, so the bench's zero-window probes are then its own, not those of tests running
/// on the same machine; ports and TIME_WAIT sockets are its own too. Needs CAP_SYS_ADMIN.
/// Call it before any other thread exists: a thread started earlier stays behind.
pub fn enter_own_netns() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("unshare(CLONE_NEWNET) failed (needs CAP_SYS_ADMIN; or pass --shared-netns)");
    }
    crate::toolchain::status(
        std::process::Command::new("ip").args(["link", "set", "dev", "lo", "up"]),
    )
}

/// Lets connect() take over a loopback TIME_WAIT port after 1 ms instead of the kernel's
/// default 1 s (`net.ipv4.tcp_tw_reuse_delay`, per network namespace, Linux 6.14 and
/// later: commit ca6a6f93867a, "tcp: Add sysctl to configure TIME-WAIT reuse delay").
/// connect() tries the even half of the ephemeral range first and reuses a TIME_WAIT port
/// of it once the delay has passed, so with the default every target, direct included,
/// stopped at the range's 14,116 even ports once a second (14.1k conn/s) in churn where
/// the client closes first: the figure measured the port range, not the proxy. Returns a
/// note for the report; call it only in the bench's own namespace, never on the
/// machine's.
pub fn shorten_time_wait_reuse() -> Result<String> {
    const KNOB: &str = "/proc/sys/net/ipv4/tcp_tw_reuse_delay";
    if !std::path::Path::new(KNOB).exists() {
        return Ok(
            "this kernel has no net.ipv4.tcp_tw_reuse_delay: a loopback TIME_WAIT \
             port is reused after 1 s, which caps client-first churn near half the \
             ephemeral port range per second"
                .to_owned(),
        );
    }
    fs::write(KNOB, "1").with_context(|| format!("writing 1 to {KNOB}"))?;
    Ok(
        "net.ipv4.tcp_tw_reuse_delay = 1 ms in the bench's namespace (default 1 s: it \
         capped client-first churn at 14.1k conn/s for every target, direct included)"
            .to_owned(),
    )
}

/// Peaks seen by a [`Sampler`], in bytes; all but `held` as growth over the first sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// The scenario's own probe (the slow reader: bytes written by the backend and not yet
    /// read by the client).
    pub held: u64,
    /// [`MemInfo::kernel`], machine-wide.
    pub kernel: u64,
    /// Memory charged to TCP sockets (/proc/net/sockstat), machine-wide.
    pub sockets: u64,
    /// The proxy process's RSS.
    pub proxy_rss: u64,
}

/// Samples memory every `interval` on its own thread until [`Sampler::finish`] (or `limit`).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Peaks>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    kernel: u64,
    sockets: u64,
    proxy_rss: u64,
}

impl Sample {
    fn take(pid: Option<u32>) -> Result<Self> {
        Ok(Self {
            kernel: meminfo()?.kernel,
            sockets: socket_mem_bytes()?,
            proxy_rss: pid.map(tree_rss_bytes).transpose()?.unwrap_or(0),
        })
    }
}

impl Sampler {
    /// Takes the baseline now, then samples on a thread: /proc for the proxy `pid` and the
    /// machine, and `held` for the scenario's own figure.
    pub fn start(
        pid: Option<u32>,
        held: impl Fn() -> u64 + Send + 'static,
        interval: Duration,
        limit: Duration,
    ) -> Result<Self> {
        let base = Sample::take(pid)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let started = Instant::now();
                let mut peaks = Peaks::default();
                while !flag.load(Ordering::Relaxed) && started.elapsed() < limit {
                    let now = Sample::take(pid)?;
                    peaks.held = peaks.held.max(held());
                    peaks.kernel = peaks.kernel.max(now.kernel.saturating_sub(base.kernel));
                    peaks.sockets = peaks.sockets.max(now.sockets.saturating_sub(base.sockets));
                    peaks.proxy_rss = peaks
                        .proxy_rss
                        .max(now.proxy_rss.saturating_sub(base.proxy_rss));
                    thread::sleep(interval);
                }
                Ok(peaks)
            })
            .context("failed to spawn the memory sampler thread")?;
        Ok(Self { stop, handle })
    }

    pub fn finish(self) -> Result<Peaks> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow!("the memory sampler thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_readers_parse_this_machine() {
        assert!(machine_busy_secs().unwrap() > 0.0);
        assert!(process_cpu_secs(std::process::id()).unwrap() >= 0.0);
        assert!(context_switches().unwrap() > 0);
        assert!(process_tree(std::process::id())
            .unwrap()
            .contains(&std::process::id()));
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        let mem = meminfo().unwrap();
        assert!(mem.total > mem.kernel && mem.kernel > mem.slab && mem.slab > 0);
        socket_mem_bytes().unwrap();
        TcpCounters::read().unwrap();
    }

    #[test]
    fn mib_values_are_found_by_section_and_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 2 64\nTcp: RtoMin RetransSegs\nTcp: 200 17\n";
        assert_eq!(mib_value("snmp", text, "Tcp:", "RetransSegs").unwrap(), 17);
        assert_eq!(mib_value("snmp", text, "Ip:", "DefaultTTL").unwrap(), 64);
        assert!(mib_value("snmp", text, "Tcp:", "InErrs").is_err());
        assert!(mib_value("snmp", text, "Udp:", "InErrors").is_err());
    }

    #[test]
    fn kib_fields_become_bytes() {
        let text = "MemTotal:       24684000 kB\nVmRSS:\t    1234 kB\n";
        assert_eq!(kib_field(text, "MemTotal:"), Some(24684000 * 1024));
        assert_eq!(kib_field(text, "VmRSS:"), Some(1234 * 1024));
        assert_eq!(kib_field(text, "Slab:"), None);
    }
}
