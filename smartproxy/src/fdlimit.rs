//! File descriptors: how many `max_connections` needs, the RLIMIT_NOFILE raise at start
//! (as HAProxy does for its `maxconn`), and the `max_connections` in force where the
//! limit still falls short.
//!
//! The arithmetic is pure ([`reserved`], [`needed`], [`connections_within`], [`plan`],
//! [`assess`]); [`raise`], [`attainable`] and the process figures make the syscalls.

use std::fmt;
use std::io;

use crate::config::{Config, ProxyConfig};

/// Per connection: the client's socket and the backend's.
pub const PER_CONNECTION: u64 = 2;
/// The control socket's listener and the requests it answers at the same time.
pub const CONTROL: u64 = 1 + 8;
/// The eBPF data path's programs, maps, links, ring buffer and cgroup; counted whether
/// or not it loads, a few descriptors not worth a rule of their own.
pub const BPF_OBJECTS: u64 = 32;
/// Everything else: stdio, the runtime's epoll and wakers, resolver sockets, the config
/// and certificate files a reload reads.
pub const MARGIN: u64 = 64;

/// The soft and hard RLIMIT_NOFILE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// The descriptors `config` needs besides its connections.
pub fn reserved(config: &Config) -> u64 {
    // A listener per route at most (routes may share one).
    let listeners = config.routes.len() as u64;
    let metrics = if config.proxy.metrics.is_some() {
        1 + crate::config::MAX_SCRAPERS as u64
    } else {
        0
    };
    listeners + CONTROL + metrics + BPF_OBJECTS + MARGIN
}

/// The descriptors `max_connections` connections need, `reserved` included.
pub fn needed(max_connections: usize, reserved: u64) -> u64 {
    (max_connections as u64)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(reserved)
}

/// The connections `limit` descriptors carry once `reserved` are set aside; at least one,
/// so that a proxy under a tiny limit still serves (and its accept loop backs off on
/// EMFILE) rather than refusing everything.
pub fn connections_within(limit: u64, reserved: u64) -> usize {
    let room = limit.saturating_sub(reserved) / PER_CONNECTION;
    usize::try_from(room).unwrap_or(usize::MAX).max(1)
}

/// The limit to set for `needed` descriptors: the soft limit raised toward it within the
/// hard one; the hard one raised too, up to `ceiling` (`fs.nr_open`), when the process
/// may (CAP_SYS_RESOURCE: `ceiling` is `Some`). Neither is ever lowered.
pub fn plan(current: Limit, needed: u64, ceiling: Option<u64>) -> Limit {
    let hard = match ceiling {
        Some(ceiling) => needed.min(ceiling).max(current.hard),
        None => current.hard,
    };
    Limit {
        soft: needed.min(hard).max(current.soft),
        hard,
    }
}

/// How the configured `max_connections` fares under a soft limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The limit carries every connection.
    Enough,
    /// Not set in the file: the proxy takes what the limit carries, `effective`.
    Derived { effective: usize },
    /// Set in the file beyond what the limit carries (`fits`): it stays, and a warning
    /// says that connections beyond `fits` will fail.
    Short { fits: usize },
}

/// `max_connections` against the file descriptor limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assessment {
    /// The file's value, or the default.
    pub configured: usize,
    /// The descriptors `configured` connections need.
    pub needed: u64,
    /// The soft limit in force.
    pub limit: u64,
    pub fit: Fit,
}

impl Assessment {
    /// The `max_connections` in force.
    pub fn max_connections(&self) -> usize {
        match self.fit {
            Fit::Derived { effective } => effective,
            Fit::Enough | Fit::Short { .. } => self.configured,
        }
    }

    /// Says where the limit falls short: one `info` line for a derived value, one
    /// warning for an explicit one; nothing when it does not.
    pub fn log(&self) {
        match self.fit {
            Fit::Enough => {}
            Fit::Derived { .. } => tracing::info!("{self}"),
            Fit::Short { .. } => tracing::warn!("{self}"),
        }
    }
}

/// Decides how `proxy.max_connections` fits under the soft limit `limit`.
pub fn assess(proxy: &ProxyConfig, reserved: u64, limit: u64) -> Assessment {
    let configured = proxy.max_connections;
    let needed = needed(configured, reserved);
    let fits = connections_within(limit, reserved);
    let fit = if needed <= limit {
        Fit::Enough
    } else if proxy.max_connections_explicit {
        Fit::Short { fits }
    } else {
        Fit::Derived {
            effective: fits.min(configured),
        }
    };
    Assessment {
        configured,
        needed,
        limit,
        fit,
    }
}

/// The `max_connections` in force for `config` under the soft limit `limit`.
pub fn max_connections(config: &Config, limit: u64) -> usize {
    assess(&config.proxy, reserved(config), limit).max_connections()
}

/// What to do about it: the one line startup logs and `smartproxy check` prints.
impl fmt::Display for Assessment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FIX: &str =
            "raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in a shell)";
        let Assessment {
            configured,
            needed,
            limit,
            fit,
        } = *self;
        match fit {
            Fit::Enough => write!(
                f,
                "max_connections = {configured} needs {needed} file descriptors; the limit is {limit}"
            ),
            Fit::Derived { effective } => write!(
                f,
                "max_connections is not set, and the file descriptor limit ({limit}) is short \
                 of the {needed} the default {configured} needs: using max_connections = \
                 {effective}; {FIX} for more"
            ),
            Fit::Short { fits } => write!(
                f,
                "max_connections = {configured} needs {needed} file descriptors, but the limit \
                 is {limit}: beyond about {fits} connections new ones fail (too many open \
                 files); {FIX}, or lower max_connections"
            ),
        }
    }
}

// === syscalls ===

/// The limit before and after a raise, and the assessment under the latter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raise {
    pub before: Limit,
    pub after: Limit,
    pub assessment: Assessment,
}

/// Why the limit could not be read or set.
#[derive(Debug, thiserror::Error)]
#[error("RLIMIT_NOFILE: {step}: {source}")]
pub struct FdLimitError {
    step: &'static str,
    #[source]
    source: io::Error,
}

/// At start, before privileges are dropped: raises RLIMIT_NOFILE toward what `config`
/// needs ([`plan`]) and assesses `max_connections` under the result.
pub fn raise(config: &Config) -> Result<Raise, FdLimitError> {
    let raise = attainable(config)?;
    if raise.after != raise.before {
        set_limit(raise.after)?;
    }
    Ok(raise)
}

/// [`raise`] without setting anything: what a start would get (`smartproxy check`).
pub fn attainable(config: &Config) -> Result<Raise, FdLimitError> {
    let before = limit()?;
    let reserved = reserved(config);
    let needed = needed(config.proxy.max_connections, reserved);
    let ceiling =
        crate::privileges::has_effective(crate::privileges::CAP_SYS_RESOURCE).then(nr_open);
    let after = plan(before, needed, ceiling);
    Ok(Raise {
        before,
        after,
        assessment: assess(&config.proxy, reserved, after.soft),
    })
}

/// The current RLIMIT_NOFILE.
pub fn limit() -> Result<Limit, FdLimitError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(FdLimitError {
            step: "getrlimit",
            source: io::Error::last_os_error(),
        });
    }
    Ok(Limit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

fn set_limit(limit: Limit) -> Result<(), FdLimitError> {
    let limit = libc::rlimit {
        rlim_cur: limit.soft,
        rlim_max: limit.hard,
    };
    // SAFETY: setrlimit reads a valid local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(FdLimitError {
            step: "setrlimit",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `fs.nr_open`, the most a hard limit may be; the kernel's default when unreadable.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// The descriptors this process has open (`/proc/self/fd`, whose listing holds one
/// more: the directory being read).
pub fn open_fds() -> io::Result<u64> {
    let listed = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(listed.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(max_connections: usize, explicit: bool) -> ProxyConfig {
        ProxyConfig {
            max_connections,
            max_connections_explicit: explicit,
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn two_descriptors_per_connection_plus_what_is_reserved() {
        assert_eq!(needed(100_000, 100), 200_100);
        assert_eq!(connections_within(200_100, 100), 100_000);
        assert_eq!(connections_within(2048, 100), 974);
        assert_eq!(connections_within(50, 100), 1, "at least one");
        assert_eq!(needed(usize::MAX, 100), u64::MAX, "saturates");
    }

    #[test]
    fn the_soft_limit_rises_within_the_hard_one_and_never_falls() {
        let current = Limit {
            soft: 1024,
            hard: 20_000,
        };
        assert_eq!(
            plan(current, 5_000, None),
            Limit {
                soft: 5_000,
                hard: 20_000
            }
        );
        assert_eq!(
            plan(current, 200_100, None),
            Limit {
                soft: 20_000,
                hard: 20_000
            }
        );
        assert_eq!(plan(current, 500, None), current, "not lowered");
    }

    #[test]
    fn a_privileged_process_raises_the_hard_limit_up_to_nr_open() {
        let current = Limit {
            soft: 1024,
            hard: 20_000,
        };
        assert_eq!(
            plan(current, 200_100, Some(1 << 20)),
            Limit {
                soft: 200_100,
                hard: 200_100
            }
        );
        assert_eq!(
            plan(current, 5_000_000, Some(1 << 20)),
            Limit {
                soft: 1 << 20,
                hard: 1 << 20
            }
        );
        assert_eq!(
            plan(current, 5_000, Some(1 << 20)),
            Limit {
                soft: 5_000,
                hard: 20_000
            },
            "the hard limit is not lowered"
        );
    }

    #[test]
    fn a_default_max_connections_is_derived_from_a_short_limit() {
        let assessment = assess(&proxy(100_000, false), 100, 2048);
        assert_eq!(assessment.fit, Fit::Derived { effective: 974 });
        assert_eq!(assessment.max_connections(), 974);
        let text = assessment.to_string();
        assert!(
            text.contains("max_connections = 974") && text.contains("2048"),
            "{text}"
        );
    }

    #[test]
    fn an_explicit_max_connections_stays_and_is_warned_about() {
        let assessment = assess(&proxy(5_000, true), 100, 2048);
        assert_eq!(assessment.fit, Fit::Short { fits: 974 });
        assert_eq!(assessment.max_connections(), 5_000);
        let text = assessment.to_string();
        for part in ["5000", "10100", "2048", "LimitNOFILE=", "ulimit -n"] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
    }

    #[test]
    fn a_limit_that_carries_everything_changes_nothing() {
        for explicit in [false, true] {
            let assessment = assess(&proxy(5_000, explicit), 100, 10_100);
            assert_eq!(assessment.fit, Fit::Enough);
            assert_eq!(assessment.max_connections(), 5_000);
        }
    }
}
