//! Connection churn: --churn-concurrency threads each connect, exchange one --message-byte
//! echo, close, and start over, for --churn-secs. A sample is connect start to echo received.
//! A failed connection is counted (and paced by a short sleep) rather than ending the run.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{echo_connection, Env};
use crate::bench::{
    metric::{quantile, Measurement, Metric},
    wire::ReadWaits,
};

/// Connections one thread makes at most (bounds the run if connections are very fast).
const MAX_PER_THREAD: usize = 5_000_000;
/// Failures one thread tolerates before the run fails.
const MAX_FAILURES: usize = 1_000;

struct ClientResult {
    latencies_ns: Vec<u64>,
    failures: usize,
    longest_wait: Duration,
    first_error: Option<anyhow::Error>,
}

pub fn run(env: &Env<'_>) -> Result<Measurement> {
    let p = env.params;
    let start = Instant::now();
    let end = start + Duration::from_secs(p.churn_secs);
    let handles = (0..p.churn_concurrency)
        .map(|i| {
            let (addr, size) = (env.addr, p.message);
            thread::Builder::new()
                .name(format!("bench-churn-{i}"))
                .spawn(move || client(addr, size, end))
                .context("failed to spawn a churn thread")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut longest_wait = Duration::ZERO;
    let mut first_error = None;
    for handle in handles {
        let r = handle
            .join()
            .map_err(|_| anyhow!("a churn thread panicked"))?;
        latencies.extend_from_slice(&r.latencies_ns);
        failures += r.failures;
        longest_wait = longest_wait.max(r.longest_wait);
        first_error = first_error.or(r.first_error);
    }
    let span = start.elapsed().as_secs_f64();
    if latencies.is_empty() {
        let why = first_error.unwrap_or_else(|| anyhow!("no connection completed"));
        bail!("connection churn: {failures} failures and no success: {why:#}");
    }
    if let Some(e) = first_error {
        eprintln!("bench: connection churn: {failures} failed connections, the first: {e:#}");
    }
    latencies.sort_unstable();
    let mut m = Measurement::default();
    m.set(Metric::ConnectionsPerSec, latencies.len() as f64 / span);
    match quantile(&latencies, 0.99) {
        Some(ns) => m.set(Metric::ConnectionP99, ns as f64 / 1e3),
        None => m.set_unavailable(Metric::ConnectionP99),
    }
    m.set(Metric::FailedConnections, failures as f64);
    m.set(Metric::LongestReadWait, longest_wait.as_secs_f64() * 1e3);
    Ok(m)
}

fn client(addr: std::net::SocketAddr, size: u64, end: Instant) -> ClientResult {
    let mut result = ClientResult {
        latencies_ns: Vec::with_capacity(64 * 1024),
        failures: 0,
        longest_wait: Duration::ZERO,
        first_error: None,
    };
    let mut waits = ReadWaits::default();
    // Bounded by the end time, MAX_PER_THREAD and MAX_FAILURES.
    while result.latencies_ns.len() < MAX_PER_THREAD && result.failures < MAX_FAILURES {
        let started = Instant::now();
        if started >= end {
            break;
        }
        match echo_connection(addr, size, &mut waits) {
            // The stream is dropped here: close() right after the exchange.
            Ok(_stream) => result
                .latencies_ns
                .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                result.failures += 1;
                result.first_error.get_or_insert(e);
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
    result.longest_wait = waits.longest;
    result
}
