//! The load scenarios: the client side of each, run from this process over 127.0.0.1 against
//! one target's address, returning what it measured.

mod bulk;
mod churn;
mod idle;
mod rr;
mod slow;

use std::{
    fmt,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::ValueEnum;

use super::{
    metric::Measurement,
    wire::{self, ReadWaits, Request, READ_POLL},
};

/// How long a connect may take before the run fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Scenario {
    /// Client -> backend, one connection, --bulk-bytes.
    BulkUpload,
    /// Backend -> client, one connection, --bulk-bytes.
    BulkDownload,
    /// 64-byte request/response over --rr-conns persistent connections for --rr-secs.
    Rr,
    /// Connect, one 64-byte exchange, close; --churn-concurrency at once for --churn-secs.
    Churn,
    /// --idle-conns connections held open after one exchange each.
    Idle,
    /// The backend offers --slow-bytes; the client reads --slow-rate per second for --slow-secs.
    SlowReader,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::BulkUpload,
        Scenario::BulkDownload,
        Scenario::Rr,
        Scenario::Churn,
        Scenario::Idle,
        Scenario::SlowReader,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::BulkUpload => "bulk upload",
            Scenario::BulkDownload => "bulk download",
            Scenario::Rr => "request/response",
            Scenario::Churn => "connection churn",
            Scenario::Idle => "idle connections",
            Scenario::SlowReader => "slow reader",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sizes and durations of the scenarios (from the command line).
#[derive(Debug, Clone)]
pub struct Params {
    pub bulk_bytes: u64,
    pub message: u64,
    pub rr_secs: u64,
    pub rr_conns: usize,
    pub churn_secs: u64,
    pub churn_concurrency: usize,
    pub idle_conns: usize,
    pub slow_bytes: u64,
    pub slow_rate: u64,
    pub slow_secs: u64,
}

/// Where a scenario sends its load.
pub struct Env<'a> {
    pub addr: SocketAddr,
    /// The proxy process, for its CPU and RSS; None for direct.
    pub proxy_pid: Option<u32>,
    /// Bytes the backend's downloads have written so far (see `Backend::sent`).
    pub backend_sent: Arc<AtomicU64>,
    pub params: &'a Params,
}

pub fn run(scenario: Scenario, env: &Env<'_>) -> Result<Measurement> {
    match scenario {
        Scenario::BulkUpload => bulk::upload(env),
        Scenario::BulkDownload => bulk::download(env),
        Scenario::Rr => rr::run(env),
        Scenario::Churn => churn::run(env),
        Scenario::Idle => idle::run(env),
        Scenario::SlowReader => slow::run(env),
    }
}

/// A blocking connection to `addr` whose reads time out every [`READ_POLL`] (so timed reads see
/// their deadlines).
fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connect to {addr} failed"))?;
    stream
        .set_read_timeout(Some(READ_POLL))
        .context("setting SO_RCVTIMEO failed")?;
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .context("setting SO_SNDTIMEO failed")?;
    Ok(stream)
}

/// An echo connection that has completed one exchange of `size` bytes, so it is routed and
/// established end to end (for the proxies: both sockets, and for ebpf the sockhash entries).
fn echo_connection(addr: SocketAddr, size: u64, waits: &mut ReadWaits) -> Result<TcpStream> {
    let mut stream = connect(addr)?;
    stream
        .set_nodelay(true)
        .context("setting TCP_NODELAY failed")?;
    let message = vec![0x42; usize::try_from(size).context("message size")?];
    let mut first = Request::Echo(size).encode().to_vec();
    first.extend_from_slice(&message);
    stream
        .write_all(&first)
        .with_context(|| format!("{addr}: sending the first echo failed"))?;
    let mut reply = vec![0; message.len()];
    wire::read_exact_timed(
        &mut stream,
        &mut reply,
        waits,
        Instant::now() + Duration::from_secs(10),
    )
    .with_context(|| format!("{addr}: reading the first echo failed"))?;
    Ok(stream)
}
