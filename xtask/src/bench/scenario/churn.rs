//! Connection churn: --churn-concurrency threads each connect, exchange one --message-size
//! echo, close, and start over, for --churn-secs. With [`Closer::Client`] the client closes
//! right after the echo; with [`Closer::Server`] the backend closes after its reply and the
//! client closes once it has read that EOF. A sample is connect start to close.
//! A failed connection is counted by kind (refused, reset, other) and paced by a short sleep
//! rather than ending the run.

use std::{
    io::Read as _,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{echo_connection_as, Closer, Env, Failure};
use crate::bench::{
    metric::{quantile, Measurement, Metric},
    system,
    wire::ReadWaits,
};

/// Connections one thread makes at most (bounds the run if connections are very fast).
const MAX_PER_THREAD: usize = 5_000_000;
/// Failures one thread tolerates before the run fails.
const MAX_FAILURES: usize = 1_000;

/// Failures by kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct Failures {
    pub refused: usize,
    pub reset: usize,
    pub other: usize,
}

impl Failures {
    pub fn count(&mut self, failure: Failure) {
        match failure {
            Failure::Refused => self.refused += 1,
            Failure::Reset => self.reset += 1,
            Failure::Other => self.other += 1,
        }
    }

    pub fn total(self) -> usize {
        self.refused + self.reset + self.other
    }

    fn add(&mut self, other: Self) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.other += other.other;
    }
}

struct ClientResult {
    latencies_ns: Vec<u64>,
    failures: Failures,
    longest_wait: Duration,
    first_error: Option<anyhow::Error>,
}

pub fn run(env: &Env<'_>, closer: Closer) -> Result<Measurement> {
    let p = env.params;
    let ctxt_before = system::context_switches()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(p.churn_secs);
    let handles = (0..p.churn_concurrency)
        .map(|i| {
            let (addr, size) = (env.addr, p.message);
            thread::Builder::new()
                .name(format!("bench-churn-{i}"))
                .spawn(move || client(addr, size, closer, end))
                .context("failed to spawn a churn thread")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut latencies = Vec::new();
    let mut failures = Failures::default();
    let mut longest_wait = Duration::ZERO;
    let mut first_error = None;
    for handle in handles {
        let r = handle
            .join()
            .map_err(|_| anyhow!("a churn thread panicked"))?;
        latencies.extend_from_slice(&r.latencies_ns);
        failures.add(r.failures);
        longest_wait = longest_wait.max(r.longest_wait);
        first_error = first_error.or(r.first_error);
    }
    let span = start.elapsed().as_secs_f64();
    let ctxt = system::context_switches()?.saturating_sub(ctxt_before);
    let total = failures.total();
    if latencies.is_empty() {
        let why = first_error.unwrap_or_else(|| anyhow!("no connection completed"));
        bail!("connection churn: {total} failures and no success: {why:#}");
    }
    if let Some(e) = first_error {
        eprintln!("bench: connection churn: {total} failed connections, the first: {e:#}");
    }
    latencies.sort_unstable();
    let mut m = Measurement::default();
    m.set(Metric::ConnectionsPerSec, latencies.len() as f64 / span);
    match quantile(&latencies, 0.99) {
        Some(ns) => m.set(Metric::ConnectionP99, ns as f64 / 1e3),
        None => m.set_unavailable(Metric::ConnectionP99),
    }
    m.set(Metric::FailedConnections, total as f64);
    m.set(Metric::Refused, failures.refused as f64);
    m.set(Metric::Resets, failures.reset as f64);
    // Per attempted connection: a failed one costs switches too.
    m.set(
        Metric::CtxPerConn,
        ctxt as f64 / (latencies.len() + total) as f64,
    );
    m.set(Metric::LongestReadWait, longest_wait.as_secs_f64() * 1e3);
    Ok(m)
}

fn client(addr: SocketAddr, size: u64, closer: Closer, end: Instant) -> ClientResult {
    let mut result = ClientResult {
        latencies_ns: Vec::with_capacity(64 * 1024),
        failures: Failures::default(),
        longest_wait: Duration::ZERO,
        first_error: None,
    };
    let mut waits = ReadWaits::default();
    // Bounded by the end time, MAX_PER_THREAD and MAX_FAILURES.
    while result.latencies_ns.len() < MAX_PER_THREAD && result.failures.total() < MAX_FAILURES {
        let started = Instant::now();
        if started >= end {
            break;
        }
        match one(addr, size, closer, &mut waits) {
            Ok(()) => result
                .latencies_ns
                .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                result.failures.count(Failure::of(&e));
                result.first_error.get_or_insert(e);
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
    result.longest_wait = waits.longest;
    result
}

/// One connection: connect, echo, close in the order `closer` says.
pub fn one(addr: SocketAddr, size: u64, closer: Closer, waits: &mut ReadWaits) -> Result<()> {
    let mut stream = echo_connection_as(addr, size, closer == Closer::Server, waits)?;
    if closer == Closer::Server {
        // The backend closes after its reply: wait for that EOF before closing.
        let mut byte = [0; 1];
        let deadline = Instant::now() + Duration::from_secs(10);
        // Bounded by the deadline: the socket's read timeout wakes the loop.
        loop {
            match stream.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => bail!("data after the echo where the backend's EOF was expected"),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) && Instant::now() < deadline => {}
                Err(e) => return Err(e).context("waiting for the backend's close failed"),
            }
        }
    }
    // Dropping the stream closes it.
    Ok(())
}
