//! Request/response: each of --rr-conns persistent connections runs its own thread that sends a
//! --message-byte request and waits for the same-size response, back to back, for --rr-secs.
//! Latency is write start to last response byte; every sample is kept and sorted.

use std::{
    io::Write as _,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use super::{echo_connection, Env};
use crate::bench::{
    metric::{quantile, Measurement, Metric},
    wire::{self, ReadWaits},
};

/// Samples one connection keeps at most (bounds memory if a run is long and fast).
const MAX_SAMPLES: usize = 20_000_000;
/// Lead time so every thread is waiting before the clock starts.
const START_DELAY: Duration = Duration::from_millis(200);

struct ClientResult {
    latencies_ns: Vec<u64>,
    longest_wait: Duration,
    finished: Instant,
}

pub fn run(env: &Env<'_>) -> Result<Measurement> {
    let p = env.params;
    let mut waits = ReadWaits::default();
    let streams = (0..p.rr_conns)
        .map(|_| echo_connection(env.addr, p.message, &mut waits))
        .collect::<Result<Vec<_>>>()
        .context("request/response: opening the connections failed")?;
    let start = Instant::now() + START_DELAY;
    let end = start + Duration::from_secs(p.rr_secs);
    let handles = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            let size = p.message;
            thread::Builder::new()
                .name(format!("bench-rr-{i}"))
                .spawn(move || client(stream, size, start, end))
                .context("failed to spawn a request/response thread")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut latencies = Vec::new();
    let mut finished = start;
    let mut longest_wait = Duration::ZERO;
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(r)) => {
                latencies.extend_from_slice(&r.latencies_ns);
                finished = finished.max(r.finished);
                longest_wait = longest_wait.max(r.longest_wait);
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(anyhow!("a request/response thread panicked")),
        }
    }
    if let Some(e) = failure {
        return Err(e.context("request/response"));
    }
    latencies.sort_unstable();
    let span = finished.duration_since(start).as_secs_f64();
    let mut m = Measurement::default();
    m.set(Metric::RequestsPerSec, latencies.len() as f64 / span);
    for (metric, q) in [
        (Metric::LatencyP50, 0.5),
        (Metric::LatencyP99, 0.99),
        (Metric::LatencyP999, 0.999),
    ] {
        match quantile(&latencies, q) {
            Some(ns) => m.set(metric, ns as f64 / 1e3),
            None => m.set_unavailable(metric),
        }
    }
    m.set(Metric::LongestReadWait, longest_wait.as_secs_f64() * 1e3);
    Ok(m)
}

fn client(mut stream: TcpStream, size: u64, start: Instant, end: Instant) -> Result<ClientResult> {
    let size = usize::try_from(size).context("message size")?;
    let request = vec![0x42; size];
    let mut response = vec![0; size];
    let mut waits = ReadWaits::default();
    let mut latencies_ns = Vec::with_capacity(64 * 1024);
    thread::sleep(start.saturating_duration_since(Instant::now()));
    // Bounded by the end time and by MAX_SAMPLES.
    while latencies_ns.len() < MAX_SAMPLES {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        stream
            .write_all(&request)
            .context("writing a request failed")?;
        wire::read_exact_timed(
            &mut stream,
            &mut response,
            &mut waits,
            end + Duration::from_secs(10),
        )
        .context("reading a response failed")?;
        latencies_ns.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(ClientResult {
        latencies_ns,
        longest_wait: waits.longest,
        finished: Instant::now(),
    })
}
