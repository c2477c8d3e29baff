//! Idle connections: open --idle-conns connections one after another, each with one echo so it
//! is established end to end, hold them, and divide the growth of memory by their number:
//! the proxy's RSS (VmRSS of /proc/PID/status, summed over its processes: nginx has workers), kernel slab (Slab of /proc/meminfo: socks,
//! inodes, files, epoll items, psocks, map elements) and socket buffers (/proc/net/sockstat
//! TCP mem). Kernel figures are machine-wide, so they include the client's and backend's
//! sockets: direct shows that share.
//!
//! Opened at once, every connection is new and busy together, and what a proxy allocated
//! for that moment stays in its RSS (an allocator keeps freed memory that shares pages
//! with live objects). Paced, the connections come in [`BATCHES`] batches
//! [`BATCH_PAUSE`] apart, the way long-lived connections pile up over time: a proxy that
//! sheds what an idle connection does not need (smartproxy parks one quiet for 1 s,
//! `smartproxy/src/park/mod.rs`) reuses that memory for the next batch.
//!
//! The proxy's RSS is read twice: [`SETTLE`] after the last connection, and again
//! [`SETTLED`] after it, once every connection has been idle long enough for smartproxy
//! to have parked it and given the freed memory back.

use std::{thread, time::Duration};

use anyhow::Result;

use super::{open_echo_connections, Env};
use crate::bench::{
    metric::{Measurement, Metric},
    system,
    units::KIB,
    wire::ReadWaits,
};

/// Time for lazily freed memory (RCU callbacks, deferred work) to settle before reading.
pub const SETTLE: Duration = Duration::from_secs(1);
/// The second reading, after the last connection: longer than smartproxy needs to park
/// 9,872 connections that went quiet together (1 s of quiet, then at most 1,024 asked
/// per sweep of 0.5 s: about 6 s) and to purge what their tasks freed.
pub const SETTLED: Duration = Duration::from_secs(8);
/// Paced: the batches the connections are opened in.
pub const BATCHES: usize = 10;
/// Paced: the pause after each batch, longer than smartproxy's park delay (1 s) and sweep
/// (0.5 s) together.
pub const BATCH_PAUSE: Duration = Duration::from_secs(2);

/// Paced: how many connections each batch holds (the last may hold fewer).
pub fn batch_len(conns: usize) -> usize {
    conns.div_ceil(BATCHES).max(1)
}

/// Paced: how many pauses opening `conns` connections takes, one after each batch.
pub fn pauses(conns: usize) -> usize {
    conns.div_ceil(batch_len(conns))
}

pub fn run(env: &Env<'_>, paced: bool) -> Result<Measurement> {
    let n = env.params.idle_conns;
    thread::sleep(SETTLE);
    let rss_before = env.proxy_pid.map(system::tree_rss_bytes).transpose()?;
    let mem_before = system::meminfo()?;
    let sock_before = system::socket_mem_bytes()?;
    let mut waits = ReadWaits::default();
    let batch = batch_len(n);
    let conns = open_echo_connections(env, n, "idle", &mut waits, |i| {
        // After the last batch too, however many it holds: it parks before the reading.
        if paced && ((i + 1) % batch == 0 || i + 1 == n) {
            thread::sleep(BATCH_PAUSE);
        }
    })?;
    thread::sleep(SETTLE);
    let rss_after = env.proxy_pid.map(system::tree_rss_bytes).transpose()?;
    let mem_after = system::meminfo()?;
    let sock_after = system::socket_mem_bytes()?;
    thread::sleep(SETTLED - SETTLE);
    let rss_settled = env.proxy_pid.map(system::tree_rss_bytes).transpose()?;
    drop(conns);

    let per_conn_kib =
        |before: u64, after: u64| (after as f64 - before as f64) / n.max(1) as f64 / KIB as f64;
    let mut m = Measurement::default();
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        m.set(Metric::ProxyRssPerConn, per_conn_kib(before, after));
    }
    if let (Some(before), Some(settled)) = (rss_before, rss_settled) {
        m.set(
            Metric::ProxyRssPerConnSettled,
            per_conn_kib(before, settled),
        );
    }
    m.set(
        Metric::KernelSlabPerConn,
        per_conn_kib(mem_before.slab, mem_after.slab),
    );
    m.set(
        Metric::SocketMemPerConn,
        per_conn_kib(sock_before, sock_after),
    );
    m.set(Metric::LongestReadWait, waits.longest.as_secs_f64() * 1e3);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_reading_is_labelled_with_its_delay() {
        let label = Metric::ProxyRssPerConnSettled.label();
        assert!(
            label.contains(&format!("{} s", SETTLED.as_secs())),
            "{label}"
        );
    }

    /// What `run` pauses, and so what the estimate counts: once after each batch,
    /// however many the connections make.
    #[test]
    fn pauses_follow_the_batches() {
        assert_eq!(pauses(9_872), BATCHES);
        assert_eq!(pauses(10), BATCHES);
        // Batches of 2: 8 of them.
        assert_eq!(pauses(15), 8);
        assert_eq!(pauses(0), 0);
    }
}
