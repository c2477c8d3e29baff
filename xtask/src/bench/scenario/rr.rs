//! Request/response: `conns` persistent connections each send a `size`-byte request and wait
//! for the same-size response, back to back, for --rr-secs: a closed loop.
//!
//! The connections are tasks on a few single-threaded tokio runtimes (one thread per core, at
//! most one per connection), not a thread each. With a blocking thread per connection, 32 or
//! 256 threads on 2 cores ran in bursts: the thread the scheduler woke did many quick round
//! trips while the rest waited in the run queue, so the median (15 µs for direct at 129k req/s
//! over 32 connections) described the lucky thread, not the load, and the generator's own
//! wake-ups swamped the context-switch count. An event loop keeps every connection's request
//! outstanding the whole time, and the loop's queueing is inside each sample: a sample runs
//! from just before the request's write to the moment the task sees the last response byte,
//! and the next request starts right after. So by Little's law the mean latency equals
//! connections / rate; the report prints both and flags a row where they differ by over 10 %.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{echo_connection, Env};
use crate::bench::{
    metric::{quantile, Measurement, Metric},
    system,
    wire::ReadWaits,
};

/// Samples one connection keeps at most (bounds memory if a run is long and fast).
const MAX_SAMPLES: usize = 20_000_000;
/// Lead time so every connection is ready before the clock starts.
const START_DELAY: Duration = Duration::from_millis(200);
/// How long a response may take after the end before the run fails.
const GRACE: Duration = Duration::from_secs(10);

struct ThreadResult {
    latencies_ns: Vec<u64>,
    finished: Instant,
}

pub fn run(env: &Env<'_>, conns: usize, size: u64) -> Result<Measurement> {
    let p = env.params;
    let mut waits = ReadWaits::default();
    let streams = (0..conns)
        .map(|_| echo_connection(env.addr, size, &mut waits))
        .collect::<Result<Vec<_>>>()
        .context("request/response: opening the connections failed")?;
    let threads = thread::available_parallelism()
        .map_or(2, usize::from)
        .clamp(1, conns.max(1));
    let mut groups: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        groups[i % threads].push(stream);
    }
    let start = Instant::now() + START_DELAY;
    let end = start + Duration::from_secs(p.rr_secs);
    let handles = groups
        .into_iter()
        .enumerate()
        .map(|(i, group)| {
            thread::Builder::new()
                .name(format!("bench-rr-{i}"))
                .spawn(move || client_thread(group, size, start, end))
                .context("failed to spawn a request/response thread")
        })
        .collect::<Result<Vec<_>>>()?;
    thread::sleep(start.saturating_duration_since(Instant::now()));
    let ctxt_before = system::context_switches()?;
    let mut latencies = Vec::new();
    let mut finished = start;
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(r)) => {
                latencies.extend_from_slice(&r.latencies_ns);
                finished = finished.max(r.finished);
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(anyhow!("a request/response thread panicked")),
        }
    }
    let ctxt = system::context_switches()?.saturating_sub(ctxt_before);
    if let Some(e) = failure {
        return Err(e.context("request/response"));
    }
    if latencies.is_empty() {
        return Err(anyhow!("request/response: no request completed"));
    }
    latencies.sort_unstable();
    let span = finished.duration_since(start).as_secs_f64();
    let count = latencies.len() as f64;
    let rate = count / span;
    let mean_ns = latencies.iter().map(|&ns| ns as f64).sum::<f64>() / count;
    let mut m = Measurement::default();
    m.set(Metric::RequestsPerSec, rate);
    m.set(Metric::LatencyMean, mean_ns / 1e3);
    m.set(Metric::ConnsOverRate, conns as f64 / rate * 1e6);
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
    m.set(Metric::CtxPerRequest, ctxt as f64 / count);
    // The longest any client waited for a response (the largest sample).
    if let Some(&max) = latencies.last() {
        m.set(Metric::LongestReadWait, max as f64 / 1e6);
    }
    Ok(m)
}

/// One event loop driving `streams`: a task per connection.
fn client_thread(
    streams: Vec<std::net::TcpStream>,
    size: u64,
    start: Instant,
    end: Instant,
) -> Result<ThreadResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start a load generator runtime")?;
    let size = usize::try_from(size).context("message size")?;
    let latencies_ns = runtime.block_on(async move {
        let mut tasks = Vec::with_capacity(streams.len());
        for stream in streams {
            stream
                .set_nonblocking(true)
                .context("setting O_NONBLOCK failed")?;
            let stream =
                tokio::net::TcpStream::from_std(stream).context("registering a connection")?;
            tasks.push(tokio::spawn(connection(stream, size, start, end)));
        }
        let mut all = Vec::new();
        for task in tasks {
            let samples = task
                .await
                .map_err(|e| anyhow!("a request/response task failed: {e}"))??;
            all.extend_from_slice(&samples);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    Ok(ThreadResult {
        latencies_ns,
        finished: Instant::now(),
    })
}

async fn connection(
    mut stream: tokio::net::TcpStream,
    size: usize,
    start: Instant,
    end: Instant,
) -> Result<Vec<u64>> {
    let request = vec![0x42; size];
    let mut response = vec![0; size];
    let mut latencies_ns = Vec::with_capacity(16 * 1024);
    tokio::time::sleep_until(start.into()).await;
    let deadline = tokio::time::Instant::from_std(end + GRACE);
    // Bounded by the end time and by MAX_SAMPLES.
    while latencies_ns.len() < MAX_SAMPLES {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        tokio::time::timeout_at(deadline, async {
            stream.write_all(&request).await?;
            stream.read_exact(&mut response).await
        })
        .await
        .map_err(|_| anyhow!("no response within {GRACE:?} of the end"))?
        .context("a request/response exchange failed")?;
        latencies_ns.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(latencies_ns)
}
