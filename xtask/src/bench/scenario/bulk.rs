//! Bulk transfer in one direction or both at once over 1 or more parallel connections (one
//! thread each, two both ways): throughput, CPU and context switches per GiB. --bulk-bytes is
//! the total each way, split evenly over the streams, so every stream count moves the same
//! bytes; both ways the throughput counts both directions together.
//!
//! The window runs from before the first connect to the last byte of the last stream: for an
//! upload, until every backend's reply that it has read everything up to EOF; for a download,
//! until the client has read every stream's last byte; both ways, until both.

use std::{
    io::Write as _,
    net::{Shutdown, TcpStream},
    thread,
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

/// What one stream saw at its receiver.
struct StreamResult {
    longest_wait: Duration,
    /// Bytes the receiver had read before its longest wait.
    wait_after: u64,
}

pub fn upload(env: &Env<'_>, streams: u32) -> Result<Measurement> {
    transfer(env, streams, "upload", upload_stream, 1)
}

pub fn download(env: &Env<'_>, streams: u32) -> Result<Measurement> {
    transfer(env, streams, "download", download_stream, 1)
}

pub fn duplex(env: &Env<'_>, streams: u32) -> Result<Measurement> {
    transfer(env, streams, "both ways", duplex_stream, 2)
}

/// Runs `stream(addr, bytes)` on `streams` threads at once, the bytes split evenly; each
/// stream moves its bytes `ways` times (once each way).
fn transfer(
    env: &Env<'_>,
    streams: u32,
    what: &str,
    stream: fn(std::net::SocketAddr, u64) -> Result<StreamResult>,
    ways: u64,
) -> Result<Measurement> {
    ensure!(streams >= 1, "{what}: at least one stream");
    let total = env.params.bulk_bytes;
    let share = total / u64::from(streams);
    ensure!(
        share > 0,
        "{what}: --bulk-bytes {total} is less than one byte per stream"
    );
    let bytes = share * u64::from(streams);
    let cpu = CpuCounters::read(env.proxy_pid)?;
    let handles = (0..streams)
        .map(|i| {
            let addr = env.addr;
            thread::Builder::new()
                .name(format!("bench-bulk-{i}"))
                .spawn(move || stream(addr, share))
                .with_context(|| format!("{what}: failed to spawn a stream thread"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut worst: Option<StreamResult> = None;
    let mut failure = None;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(r)) => {
                if worst
                    .as_ref()
                    .is_none_or(|w| r.longest_wait > w.longest_wait)
                {
                    worst = Some(r);
                }
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e.context(format!("{what}: stream {} of {streams}", i + 1)));
            }
            Err(_) => {
                failure.get_or_insert(anyhow!("{what}: a stream thread panicked"));
            }
        }
    }
    let spent = cpu.spent(env.proxy_pid)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let worst = worst.ok_or_else(|| anyhow!("{what}: no stream ran"))?;
    Ok(measurement(bytes * ways, spent, &worst))
}

fn upload_stream(addr: std::net::SocketAddr, bytes: u64) -> Result<StreamResult> {
    let mut stream = connect(addr)?;
    stream
        .write_all(&Request::Upload.encode())
        .context("sending the header failed")?;
    write_then_shut(&mut stream, bytes)?;
    let reply = backend_reply(&mut stream, bytes, Instant::now() + LIMIT)?;
    Ok(StreamResult {
        longest_wait: reply.longest_wait,
        wait_after: reply.longest_after,
    })
}

/// The backend's count of what it read, which must be `bytes`.
fn backend_reply(stream: &mut TcpStream, bytes: u64, deadline: Instant) -> Result<UploadReply> {
    let mut reply = [0; UploadReply::LEN];
    wire::read_exact_timed(stream, &mut reply, &mut ReadWaits::default(), deadline)
        .context("reading the backend's reply failed")?;
    let reply = UploadReply::decode(&reply);
    ensure!(
        reply.received == bytes,
        "the backend received {} bytes, the client sent {bytes}",
        reply.received
    );
    Ok(reply)
}

/// Writes `bytes`, then shuts down the write side.
fn write_then_shut(stream: &mut TcpStream, bytes: u64) -> Result<()> {
    let buf = vec![0xa5; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("write failed after {} bytes", bytes - left))?;
        left -= n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .context("shutdown(SHUT_WR) failed")
}

/// Sends `bytes` on a thread of its own while it reads the backend's `bytes`, then the
/// backend's count of what it read, then EOF. The longest read wait is the longer of the
/// two ends'.
fn duplex_stream(addr: std::net::SocketAddr, bytes: u64) -> Result<StreamResult> {
    let mut stream = connect(addr)?;
    stream
        .write_all(&Request::Duplex(bytes).encode())
        .context("sending the header failed")?;
    let mut writer = stream
        .try_clone()
        .context("cloning the socket for its writer failed")?;
    let sending = thread::Builder::new()
        .name("bench-duplex-writer".into())
        .spawn(move || write_then_shut(&mut writer, bytes))
        .context("spawning the writer failed")?;
    let deadline = Instant::now() + LIMIT;
    let mut buf = vec![0; CHUNK];
    let mut waits = ReadWaits::default();
    let read = read_exactly(&mut stream, &mut buf, bytes, &mut waits, deadline);
    if read.is_err() {
        // The writer's next write fails at once instead of feeding the next run.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let written = sending
        .join()
        .map_err(|_| anyhow!("the writer panicked"))
        .and_then(|written| written.context("the writer failed"));
    read?;
    written?;
    let reply = backend_reply(&mut stream, bytes, deadline)?;
    // A proxy that duplicates data shows as bytes after the reply.
    ensure!(
        wire::read_timed(&mut stream, &mut buf, &mut ReadWaits::default(), deadline)
            .context("reading the backend's EOF failed")?
            == Got::Eof,
        "bytes after the backend's reply"
    );
    Ok(if reply.longest_wait > waits.longest {
        StreamResult {
            longest_wait: reply.longest_wait,
            wait_after: reply.longest_after,
        }
    } else {
        StreamResult {
            longest_wait: waits.longest,
            wait_after: waits.longest_after,
        }
    })
}

/// Reads exactly `bytes`, no further: what follows is the backend's reply.
fn read_exactly(
    stream: &mut TcpStream,
    buf: &mut [u8],
    bytes: u64,
    waits: &mut ReadWaits,
    deadline: Instant,
) -> Result<()> {
    let mut received = 0u64;
    while received < bytes {
        let want = usize::try_from(bytes - received).map_or(buf.len(), |l| l.min(buf.len()));
        match wire::read_timed(stream, &mut buf[..want], waits, deadline)
            .with_context(|| format!("read failed after {received} bytes"))?
        {
            Got::Data(n) => received += n as u64,
            Got::Eof => bail!("EOF after {received} of {bytes} bytes"),
            Got::Deadline => bail!("{received} of {bytes} bytes in {LIMIT:?}"),
        }
    }
    Ok(())
}

fn download_stream(addr: std::net::SocketAddr, bytes: u64) -> Result<StreamResult> {
    let mut stream = connect(addr)?;
    stream
        .write_all(&Request::Download(bytes).encode())
        .context("sending the header failed")?;
    let deadline = Instant::now() + LIMIT;
    let mut buf = vec![0; CHUNK];
    let mut waits = ReadWaits::default();
    let mut received = 0u64;
    // Read to EOF, not just to `bytes`: a proxy that duplicates data shows as extra bytes.
    loop {
        match wire::read_timed(&mut stream, &mut buf, &mut waits, deadline)
            .with_context(|| format!("read failed after {received} bytes"))?
        {
            Got::Data(n) => received += n as u64,
            Got::Eof => break,
            Got::Deadline => bail!("{received} of {bytes} bytes in {LIMIT:?}"),
        }
    }
    ensure!(
        received == bytes,
        "received {received} bytes, but the backend sent {bytes}"
    );
    Ok(StreamResult {
        longest_wait: waits.longest,
        wait_after: waits.longest_after,
    })
}

/// The stream with the longest receiver wait is `worst`.
fn measurement(bytes: u64, spent: CpuSpent, worst: &StreamResult) -> Measurement {
    let gib = bytes as f64 / GIB as f64;
    let mut m = Measurement::default();
    m.set(Metric::Throughput, bytes as f64 * 8.0 / spent.wall / 1e9);
    if let Some(proxy) = spent.proxy {
        m.set(Metric::ProxyCpuPerGib, proxy / gib);
    }
    m.set(Metric::MachineCpuPerGib, spent.machine / gib);
    m.set(Metric::CtxPerGib, spent.ctxt as f64 / gib);
    m.set(
        Metric::LongestReadWait,
        worst.longest_wait.as_secs_f64() * 1e3,
    );
    m.set(
        Metric::LongestReadWaitAt,
        worst.wait_after as f64 / MIB as f64,
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::backend::Backend;

    #[test]
    fn a_stream_both_ways_moves_every_byte_each_way_and_reads_the_backends_count() {
        let backend = Backend::start().expect("the backend starts");
        let bytes = 3 * u64::try_from(CHUNK).expect("a chunk fits u64") + 12_345;
        duplex_stream(backend.addr(), bytes).expect("a stream both ways");
        assert_eq!(
            backend.sent().load(std::sync::atomic::Ordering::Relaxed),
            bytes,
            "the backend sent its bytes"
        );
    }
}
