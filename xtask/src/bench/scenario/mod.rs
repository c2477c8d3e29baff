//! The load scenarios: the client side of each, run from this process over 127.0.0.1 against
//! one target's address, returning what it measured. A scenario is a family (bulk,
//! request/response, churn, ...) with its shape (streams, connections, message size, closer).

mod bulk;
mod churn;
pub(super) mod heartbeat;
pub(super) mod idle;
mod rr;
mod slow;
mod upgrade;

use std::{
    cell::Cell,
    fmt, io,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    metric::Measurement,
    target::Target,
    wire::{self, ReadWaits, Request, READ_POLL},
};

/// How long a connect may take before the run fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest opening the connections a scenario holds may take.
const OPEN_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Client -> backend.
    Upload,
    /// Backend -> client.
    Download,
    /// Both at once, --bulk-bytes each way.
    BothWays,
}

/// Who closes a churn connection first (and so who holds its TIME_WAIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Closer {
    Client,
    Server,
}

/// A scenario family: one table of the report each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Bulk,
    Rr,
    Churn,
    Idle,
    Slow,
    Upgrade,
}

impl Family {
    pub fn title(self) -> &'static str {
        match self {
            Family::Bulk => "Bulk transfer",
            Family::Rr => "Request/response",
            Family::Churn => "Connection churn",
            Family::Idle => "Idle connections",
            Family::Slow => "Slow reader",
            Family::Upgrade => "Upgrade (issue 15)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scenario {
    /// --bulk-bytes in total, split over `streams` connections, in one direction or each way.
    Bulk { direction: Direction, streams: u32 },
    /// `size`-byte request/response over `conns` persistent connections for --rr-secs.
    Rr { conns: usize, size: u64 },
    /// Connect, one --message-size echo, close; --churn-concurrency at once for --churn-secs.
    Churn { closer: Closer },
    /// --idle-conns connections held open after one exchange each; `paced`: opened in
    /// batches that have time to go idle in between (`idle::BATCHES`).
    Idle { paced: bool },
    /// --idle-conns connections, each with one --message-size echo every
    /// `heartbeat::EVERY`.
    Heartbeat,
    /// The backend offers --slow-bytes; the client reads --slow-rate per second for --slow-secs.
    SlowReader,
    /// `smartproxy upgrade` with --upgrade-conns live connections (issue 15).
    Upgrade,
}

const KIB16: u64 = 16 * 1024;
/// Messages larger than one 64 KiB read: the relay's stream reads (issue 14).
const KIB256: u64 = 256 * 1024;

impl Scenario {
    /// Every scenario, in report order (`--all`).
    pub const ALL: [Scenario; 22] = [
        Scenario::Bulk {
            direction: Direction::Upload,
            streams: 1,
        },
        Scenario::Bulk {
            direction: Direction::Upload,
            streams: 4,
        },
        Scenario::Bulk {
            direction: Direction::Upload,
            streams: 16,
        },
        Scenario::Bulk {
            direction: Direction::Download,
            streams: 1,
        },
        Scenario::Bulk {
            direction: Direction::Download,
            streams: 4,
        },
        Scenario::Bulk {
            direction: Direction::Download,
            streams: 16,
        },
        Scenario::Bulk {
            direction: Direction::BothWays,
            streams: 1,
        },
        Scenario::Bulk {
            direction: Direction::BothWays,
            streams: 4,
        },
        Scenario::Rr { conns: 1, size: 64 },
        Scenario::Rr {
            conns: 32,
            size: 64,
        },
        Scenario::Rr {
            conns: 256,
            size: 64,
        },
        Scenario::Rr {
            conns: 1,
            size: KIB16,
        },
        Scenario::Rr {
            conns: 32,
            size: KIB16,
        },
        Scenario::Rr {
            conns: 256,
            size: KIB16,
        },
        Scenario::Rr {
            conns: 32,
            size: KIB256,
        },
        Scenario::Churn {
            closer: Closer::Client,
        },
        Scenario::Churn {
            closer: Closer::Server,
        },
        Scenario::Idle { paced: false },
        Scenario::Idle { paced: true },
        Scenario::Heartbeat,
        Scenario::SlowReader,
        Scenario::Upgrade,
    ];

    /// What runs without `--all` or `--scenarios`: sized so that with `--with-peers` the run
    /// fits 15 minutes on 2 cores (the estimate is printed at the start). Left out: the 16 KiB
    /// request/response rows on 1 and 256 connections (32 connections stands for them), the
    /// 256 KiB one, bulk both ways (twice the bytes of a one-way run), the slow reader,
    /// which takes 20 s a run and answers issue 4, not issue 14, the paced idle
    /// connections (over 20 s a run) and the heartbeats (about 27 s a run).
    pub fn is_default(self) -> bool {
        !matches!(
            self,
            Scenario::Bulk {
                direction: Direction::BothWays,
                ..
            } | Scenario::Rr {
                conns: 1 | 256,
                size: KIB16
            } | Scenario::Rr { size: KIB256, .. }
                | Scenario::SlowReader
                | Scenario::Idle { paced: true }
                | Scenario::Heartbeat
        )
    }

    /// Both idle scenarios: at once and paced.
    pub const IDLE: [Scenario; 2] = [
        Scenario::Idle { paced: false },
        Scenario::Idle { paced: true },
    ];

    /// The scenarios that hold --idle-conns connections.
    pub const HOLDING_IDLE_CONNS: [Scenario; 3] =
        [Scenario::IDLE[0], Scenario::IDLE[1], Scenario::Heartbeat];

    pub fn family(self) -> Family {
        match self {
            Scenario::Bulk { .. } => Family::Bulk,
            Scenario::Rr { .. } => Family::Rr,
            Scenario::Churn { .. } => Family::Churn,
            Scenario::Idle { .. } | Scenario::Heartbeat => Family::Idle,
            Scenario::SlowReader => Family::Slow,
            Scenario::Upgrade => Family::Upgrade,
        }
    }

    /// Whether the scenario means anything for `target`: an upgrade is smartproxy's own.
    pub fn applies_to(self, target: Target) -> bool {
        match self {
            Scenario::Upgrade => target.is_smartproxy(),
            _ => true,
        }
    }

    /// The most connections the scenario holds at once (for the fd limit and the proxies'
    /// connection limits).
    pub fn connections(self, p: &Params) -> usize {
        match self {
            Scenario::Bulk { streams, .. } => streams as usize,
            Scenario::Rr { conns, .. } => conns,
            Scenario::Churn { .. } => p.churn_concurrency,
            Scenario::Idle { .. } | Scenario::Heartbeat => p.idle_conns,
            Scenario::SlowReader => 1,
            // The streams are among the connections; the connect loop adds one.
            Scenario::Upgrade => p.upgrade_conns + 1,
        }
    }

    /// The name on the command line (`--scenarios`).
    pub fn slug(self) -> String {
        match self {
            Scenario::Bulk {
                direction: Direction::Upload,
                streams,
            } => format!("bulk-upload-{streams}"),
            Scenario::Bulk {
                direction: Direction::Download,
                streams,
            } => {
                format!("bulk-download-{streams}")
            }
            Scenario::Bulk {
                direction: Direction::BothWays,
                streams,
            } => format!("bulk-duplex-{streams}"),
            Scenario::Rr { conns, size } => format!("rr-{conns}x{}", size_slug(size)),
            Scenario::Churn {
                closer: Closer::Client,
            } => "churn-client-close".to_owned(),
            Scenario::Churn {
                closer: Closer::Server,
            } => "churn-server-close".to_owned(),
            Scenario::Idle { paced: false } => "idle".to_owned(),
            Scenario::Idle { paced: true } => "idle-paced".to_owned(),
            Scenario::Heartbeat => "heartbeat".to_owned(),
            Scenario::SlowReader => "slow-reader".to_owned(),
            Scenario::Upgrade => "upgrade".to_owned(),
        }
    }

    /// The name in the report.
    pub fn title(self) -> String {
        match self {
            Scenario::Bulk { direction, streams } => format!(
                "{}, {streams} stream{}",
                match direction {
                    Direction::Upload => "upload",
                    Direction::Download => "download",
                    Direction::BothWays => "both ways",
                },
                if streams == 1 { "" } else { "s" }
            ),
            Scenario::Rr { conns, size } => format!(
                "{conns} conn{} × {}",
                if conns == 1 { "" } else { "s" },
                super::units::show_bytes(size)
            ),
            Scenario::Churn {
                closer: Closer::Client,
            } => "client closes first".to_owned(),
            Scenario::Churn {
                closer: Closer::Server,
            } => "server closes first".to_owned(),
            Scenario::Idle { paced: false } => "opened at once".to_owned(),
            Scenario::Idle { paced: true } => format!(
                "opened in {} batches {} s apart",
                idle::BATCHES,
                idle::BATCH_PAUSE.as_secs()
            ),
            Scenario::Heartbeat => format!(
                "a heartbeat (echo) on each every {} s",
                heartbeat::EVERY.as_secs()
            ),
            Scenario::SlowReader => "slow reader".to_owned(),
            Scenario::Upgrade => "upgrade".to_owned(),
        }
    }

    /// Resolves `--scenarios` words: a scenario's slug, or a family (`bulk`, `bulk-upload`,
    /// `bulk-download`, `bulk-duplex`, `rr`, `churn`) for all of its scenarios.
    pub fn resolve(words: &[String]) -> Result<Vec<Scenario>, String> {
        let mut out = Vec::new();
        for word in words {
            let word = word.trim();
            let matched: Vec<Scenario> = Scenario::ALL
                .into_iter()
                .filter(|s| {
                    let slug = s.slug();
                    slug == word
                        || (slug.starts_with(word)
                            && slug.as_bytes().get(word.len()) == Some(&b'-')
                            && matches!(
                                word,
                                "bulk"
                                    | "bulk-upload"
                                    | "bulk-download"
                                    | "bulk-duplex"
                                    | "rr"
                                    | "churn"
                            ))
                })
                .collect();
            if matched.is_empty() {
                let names: Vec<String> = Scenario::ALL.iter().map(|s| s.slug()).collect();
                return Err(format!(
                    "unknown scenario {word:?}; known: {}, or a family: bulk, bulk-upload, \
                     bulk-download, bulk-duplex, rr, churn",
                    names.join(", ")
                ));
            }
            for s in matched {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out.sort_unstable_by_key(|s| Scenario::ALL.iter().position(|a| a == s));
        Ok(out)
    }
}

fn size_slug(size: u64) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{}k", size / 1024)
    } else {
        size.to_string()
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.slug())
    }
}

/// Sizes and durations of the scenarios (from the command line).
#[derive(Debug, Clone)]
pub struct Params {
    pub bulk_bytes: u64,
    /// Message size of churn, idle and upgrade exchanges.
    pub message: u64,
    pub rr_secs: u64,
    pub churn_secs: u64,
    pub churn_concurrency: usize,
    pub idle_conns: usize,
    pub slow_bytes: u64,
    pub slow_rate: u64,
    pub slow_secs: u64,
    pub upgrade_conns: usize,
    pub upgrade_streams: usize,
}

/// Where a scenario sends its load.
pub struct Env<'a> {
    pub addr: SocketAddr,
    /// The proxy process, for its CPU and RSS; None for direct.
    pub proxy_pid: Option<u32>,
    /// Bytes the backend's downloads and duplex streams have written so far (see
    /// `Backend::sent`).
    pub backend_sent: Arc<AtomicU64>,
    pub params: &'a Params,
    /// The smartproxy binary and the proxy's control socket (upgrade only).
    pub smartproxy: Option<&'a Path>,
    pub control: Option<&'a Path>,
    /// Set by the upgrade scenario to the process that now runs the proxy (the successor
    /// `smartproxy upgrade` reported), so the bench stops that one afterwards.
    pub successor: &'a Cell<Option<u32>>,
}

pub fn run(scenario: Scenario, env: &Env<'_>) -> Result<Measurement> {
    match scenario {
        Scenario::Bulk {
            direction: Direction::Upload,
            streams,
        } => bulk::upload(env, streams),
        Scenario::Bulk {
            direction: Direction::Download,
            streams,
        } => bulk::download(env, streams),
        Scenario::Bulk {
            direction: Direction::BothWays,
            streams,
        } => bulk::duplex(env, streams),
        Scenario::Rr { conns, size } => rr::run(env, conns, size),
        Scenario::Churn { closer } => churn::run(env, closer),
        Scenario::Idle { paced } => idle::run(env, paced),
        Scenario::Heartbeat => heartbeat::run(env),
        Scenario::SlowReader => slow::run(env),
        Scenario::Upgrade => upgrade::run(env),
    }
}

/// Why a connection failed, for the churn and upgrade counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// ECONNREFUSED: nobody listened (or the listen queue overflowed with syncookies off).
    Refused,
    /// ECONNRESET or EPIPE: the peer sent an RST.
    Reset,
    /// Anything else: an early EOF, a timeout, another error.
    Other,
}

impl Failure {
    /// Classifies by the first `io::Error` in the chain.
    pub fn of(error: &anyhow::Error) -> Self {
        let kind = error
            .chain()
            .find_map(|e| e.downcast_ref::<io::Error>())
            .map(io::Error::kind);
        match kind {
            Some(io::ErrorKind::ConnectionRefused) => Failure::Refused,
            Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => Failure::Reset,
            _ => Failure::Other,
        }
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

/// One more echo round trip of `size` bytes on an established echo connection.
fn echo_round_trip(stream: &mut TcpStream, size: u64, waits: &mut ReadWaits) -> Result<()> {
    let message = vec![0x42; usize::try_from(size).context("message size")?];
    stream
        .write_all(&message)
        .context("sending an echo failed")?;
    let mut reply = vec![0; message.len()];
    wire::read_exact_timed(
        stream,
        &mut reply,
        waits,
        Instant::now() + Duration::from_secs(10),
    )
    .context("reading an echo failed")
}

/// `n` [`echo_connection`]s opened one after another, for the scenario `what` (error
/// messages); `after_each(i)` runs once connection `i` is open (a pause, say).
fn open_echo_connections(
    env: &Env<'_>,
    n: usize,
    what: &str,
    waits: &mut ReadWaits,
    mut after_each: impl FnMut(usize),
) -> Result<Vec<TcpStream>> {
    let opened_by = Instant::now() + OPEN_LIMIT;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() >= opened_by {
            anyhow::bail!("{what}: only {i} of {n} connections opened in {OPEN_LIMIT:?}");
        }
        let stream = echo_connection(env.addr, env.params.message, waits)
            .with_context(|| format!("{what}: opening connection {} of {n} failed", i + 1))?;
        conns.push(stream);
        after_each(i);
    }
    Ok(conns)
}

/// An echo connection that has completed one exchange of `size` bytes, so it is routed and
/// established end to end (for the proxies: both sockets, and for ebpf the sockhash entries).
fn echo_connection(addr: SocketAddr, size: u64, waits: &mut ReadWaits) -> Result<TcpStream> {
    echo_connection_as(addr, size, false, waits)
}

/// [`echo_connection`]; with `once` the backend closes after this exchange
/// ([`Request::EchoOnce`]).
fn echo_connection_as(
    addr: SocketAddr,
    size: u64,
    once: bool,
    waits: &mut ReadWaits,
) -> Result<TcpStream> {
    let request = if once {
        Request::EchoOnce(size)
    } else {
        Request::Echo(size)
    };
    let mut stream = connect(addr)?;
    stream
        .set_nodelay(true)
        .context("setting TCP_NODELAY failed")?;
    let message = vec![0x42; usize::try_from(size).context("message size")?];
    let mut first = request.encode().to_vec();
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
