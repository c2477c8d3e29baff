//! The process's own figures from `/proc`, for Prometheus' standard `process_*` metrics:
//! resident memory, CPU seconds and start time. (Open and max descriptors come from
//! `fdlimit`.)
//!
//! Each figure is `None` when its file cannot be read or parsed: a scrape then leaves that
//! metric out (the cause is logged at debug) rather than failing.

use tracing::debug;

/// What `/proc/self/stat` and `/proc/stat` say about this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub resident_memory_bytes: Option<u64>,
    /// User and system time together.
    pub cpu_seconds: Option<f64>,
    /// Unix time the process started.
    pub start_time_seconds: Option<f64>,
}

/// Reads the figures now.
pub fn figures() -> Figures {
    let stat = read("/proc/self/stat").and_then(|text| {
        parse_self_stat(&text).ok_or_else(|| "/proc/self/stat: unexpected format".to_owned())
    });
    let stat = match stat {
        Ok(stat) => stat,
        Err(why) => {
            debug!("process metrics: {why}");
            return Figures::default();
        }
    };
    let ticks = clock_ticks();
    let boot = read("/proc/stat").and_then(|text| {
        parse_boot_time(&text).ok_or_else(|| "/proc/stat: no btime line".to_owned())
    });
    let start_time_seconds = match boot {
        Ok(boot) => Some(boot as f64 + stat.start_ticks as f64 / ticks),
        Err(why) => {
            debug!("process metrics: {why}");
            None
        }
    };
    Figures {
        resident_memory_bytes: Some(stat.rss_pages.saturating_mul(page_size() as u64)),
        cpu_seconds: Some((stat.utime_ticks + stat.stime_ticks) as f64 / ticks),
        start_time_seconds,
    }
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// The fields of `/proc/self/stat` used here (proc(5)), in their raw units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SelfStat {
    utime_ticks: u64,
    stime_ticks: u64,
    /// Since boot.
    start_ticks: u64,
    rss_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from after its last `)`.
fn parse_self_stat(text: &str) -> Option<SelfStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(SelfStat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time, in Unix seconds.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// Clock ticks per second (`CLK_TCK`), the unit of the stat times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // Linux has said 100 on every architecture for decades; -1 is not expected.
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The system's page size (resident memory is counted in pages; the kernel's ring buffer
/// is sized in them).
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_stat_fields_count_from_after_the_command_name() {
        let text = "16770 (a (b) c) R 16765 16765 8096 0 -1 4194304 99 0 0 0 \
                    7 3 0 0 20 0 1 0 241351 3133440 382 18446744073709551615 0\n";
        assert_eq!(
            parse_self_stat(text),
            Some(SelfStat {
                utime_ticks: 7,
                stime_ticks: 3,
                start_ticks: 241_351,
                rss_pages: 382,
            })
        );
        assert_eq!(parse_self_stat("1 (x) R 1 2 3"), None, "too short");
        assert_eq!(parse_self_stat("no parenthesis"), None);
    }

    #[test]
    fn boot_time_is_the_btime_line() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1796399581\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_796_399_581));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }

    #[test]
    fn this_process_has_figures() {
        let figures = figures();
        assert!(figures.resident_memory_bytes.is_some_and(|b| b > 0));
        assert!(figures.cpu_seconds.is_some_and(|s| s >= 0.0));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let started = figures.start_time_seconds.expect("a start time");
        // Not after now (a second's slack: btime is whole seconds), and not long before:
        // the test process started moments ago.
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
    }
}
