//! Slow reader: the backend offers --slow-bytes as fast as it can; the client reads at most
//! --slow-rate bytes per second for --slow-secs, then closes (with unread data: a reset).
//! This is where a proxy without backpressure queues without bound.
//!
//! A sampler reads every 100 ms the bytes in flight for this connection (written by the backend,
//! not yet read by the client: exact, and held by the kernel or the proxy), machine-wide kernel
//! memory and socket memory, and the proxy's RSS; the report keeps each peak above its value at
//! the start.

use std::{
    io::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{connect, Env};
use crate::bench::{
    metric::{Measurement, Metric},
    system::Sampler,
    units::MIB,
    wire::{self, Got, ReadWaits, Request},
};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The most the client reads at once; smaller than one pacing step at low rates.
const MAX_READ: usize = 64 * 1024;

pub fn run(env: &Env<'_>) -> Result<Measurement> {
    let p = env.params;
    if p.slow_rate == 0 {
        bail!("slow reader: --slow-rate must be above 0");
    }
    let duration = Duration::from_secs(p.slow_secs);
    let read = Arc::new(AtomicU64::new(0));
    let in_flight = {
        let (sent, read) = (Arc::clone(&env.backend_sent), Arc::clone(&read));
        let sent_before = sent.load(Ordering::Relaxed);
        move || {
            let sent = sent.load(Ordering::Relaxed).saturating_sub(sent_before);
            sent.saturating_sub(read.load(Ordering::Relaxed))
        }
    };
    let sampler = Sampler::start(
        env.proxy_pid,
        in_flight,
        SAMPLE_EVERY,
        duration + Duration::from_secs(60),
    )?;
    let longest_wait = read_slowly(env, duration, &read);
    let peaks = sampler.finish()?;
    let longest_wait = longest_wait?;

    let mib = |bytes: u64| bytes as f64 / MIB as f64;
    let mut m = Measurement::default();
    m.set(Metric::PeakInFlight, mib(peaks.held));
    m.set(Metric::PeakKernelMem, mib(peaks.kernel));
    m.set(Metric::PeakSocketMem, mib(peaks.sockets));
    if env.proxy_pid.is_some() {
        m.set(Metric::PeakProxyRss, mib(peaks.proxy_rss));
    }
    m.set(Metric::Delivered, mib(read.load(Ordering::Relaxed)));
    m.set(Metric::LongestReadWait, longest_wait.as_secs_f64() * 1e3);
    Ok(m)
}

/// Reads at the paced rate until the time is up or everything arrived, counting in `read`;
/// returns the longest single read wait (pacing sleeps are not waits).
fn read_slowly(env: &Env<'_>, duration: Duration, read: &AtomicU64) -> Result<Duration> {
    let p = env.params;
    let mut stream = connect(env.addr)?;
    stream
        .write_all(&Request::Download(p.slow_bytes).encode())
        .context("slow reader: sending the header failed")?;
    let chunk = usize::try_from(p.slow_rate / 20)
        .unwrap_or(MAX_READ)
        .clamp(1, MAX_READ);
    let mut buf = vec![0; chunk];
    let mut waits = ReadWaits::default();
    let start = Instant::now();
    let end = start + duration;
    let mut got = 0u64;
    // Bounded by the end time and the offered bytes.
    while got < p.slow_bytes {
        // Read the next chunk no earlier than the rate allows.
        let due = start + Duration::from_secs_f64(got as f64 / p.slow_rate as f64);
        let now = Instant::now();
        if due >= end {
            break;
        }
        if due > now {
            thread::sleep(due - now);
        }
        match wire::read_timed(&mut stream, &mut buf, &mut waits, end)
            .with_context(|| format!("slow reader: read failed after {got} bytes"))?
        {
            Got::Data(n) => {
                got += n as u64;
                read.store(got, Ordering::Relaxed);
            }
            Got::Eof | Got::Deadline => break,
        }
    }
    // Dropping the stream closes it with unread data in its receive queue: a reset.
    Ok(waits.longest)
}
