//! Bulk transfer over one connection, each direction on its own: throughput and CPU per GiB.
//!
//! The window runs from before connect to the last byte: for an upload, until the backend's
//! reply that it has read everything up to EOF; for a download, until the client has read the
//! last byte.

use std::{
    io::Write as _,
    net::Shutdown,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use super::{connect, Env};
use crate::bench::{
    metric::{CpuCounters, CpuSpent, Measurement, Metric},
    units::{GIB, MIB},
    wire::{self, Got, ReadWaits, Request, UploadReply, CHUNK},
};

/// A bulk run that takes longer than this has stalled: fail instead of hanging.
const LIMIT: Duration = Duration::from_secs(300);

pub fn upload(env: &Env<'_>) -> Result<Measurement> {
    let bytes = env.params.bulk_bytes;
    let cpu = CpuCounters::read(env.proxy_pid)?;
    let mut stream = connect(env.addr)?;
    stream
        .write_all(&Request::Upload.encode())
        .context("upload: sending the header failed")?;
    let buf = vec![0xa5; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("upload: write failed after {} bytes", bytes - left))?;
        left -= n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .context("upload: shutdown(SHUT_WR) failed")?;
    let mut reply = [0; UploadReply::LEN];
    wire::read_exact_timed(
        &mut stream,
        &mut reply,
        &mut ReadWaits::default(),
        Instant::now() + LIMIT,
    )
    .context("upload: reading the backend's reply failed")?;
    let spent = cpu.spent(env.proxy_pid)?;
    let reply = UploadReply::decode(&reply);
    ensure!(
        reply.received == bytes,
        "upload: the backend received {} bytes, the client sent {bytes}",
        reply.received
    );
    Ok(measurement(
        bytes,
        spent,
        reply.longest_wait,
        reply.longest_after,
    ))
}

pub fn download(env: &Env<'_>) -> Result<Measurement> {
    let bytes = env.params.bulk_bytes;
    let cpu = CpuCounters::read(env.proxy_pid)?;
    let mut stream = connect(env.addr)?;
    stream
        .write_all(&Request::Download(bytes).encode())
        .context("download: sending the header failed")?;
    let deadline = Instant::now() + LIMIT;
    let mut buf = vec![0; CHUNK];
    let mut waits = ReadWaits::default();
    let mut received = 0u64;
    let mut spent = None;
    // Read to EOF, not just to `bytes`: a proxy that duplicates data shows as extra bytes.
    loop {
        match wire::read_timed(&mut stream, &mut buf, &mut waits, deadline)
            .with_context(|| format!("download: read failed after {received} bytes"))?
        {
            Got::Data(n) => {
                received += n as u64;
                if received >= bytes && spent.is_none() {
                    spent = Some(cpu.spent(env.proxy_pid)?);
                }
            }
            Got::Eof => break,
            Got::Deadline => bail!("download: {received} of {bytes} bytes in {LIMIT:?}"),
        }
    }
    ensure!(
        received <= bytes,
        "download: received {received} bytes, but the backend sent {bytes}: {} bytes too many",
        received - bytes
    );
    let spent = spent.ok_or_else(|| anyhow!("download: EOF after {received} of {bytes} bytes"))?;
    Ok(measurement(
        bytes,
        spent,
        waits.longest,
        waits.longest_after,
    ))
}

/// `longest_wait` at the receiver, after it had read `wait_after` bytes.
fn measurement(
    bytes: u64,
    spent: CpuSpent,
    longest_wait: Duration,
    wait_after: u64,
) -> Measurement {
    let gib = bytes as f64 / GIB as f64;
    let mut m = Measurement::default();
    m.set(Metric::Throughput, bytes as f64 * 8.0 / spent.wall / 1e9);
    if let Some(proxy) = spent.proxy {
        m.set(Metric::ProxyCpuPerGib, proxy / gib);
    }
    m.set(Metric::MachineCpuPerGib, spent.machine / gib);
    m.set(Metric::LongestReadWait, longest_wait.as_secs_f64() * 1e3);
    m.set(Metric::LongestReadWaitAt, wait_after as f64 / MIB as f64);
    m
}
