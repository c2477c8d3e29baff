//! The soak's clients: long-lived idle connections, rate-bounded streams both ways, slow
//! readers, half-closes either way round, churn, resets, and requests and answers that end
//! the connection at once, all through one proxy until told to stop. Each finished
//! connection counts the closure reason the proxy must record for it; anything unexpected
//! is a failure, counted against the connection's [`Kind`].

use std::{
    future::Future,
    io,
    net::SocketAddr,
    ops::RangeInclusive,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{oneshot, watch, Semaphore},
    task::JoinSet,
    time::{interval, sleep, MissedTickBehavior},
};

use super::{
    backend::{expect_reset, read_until_closed, Ending, Ledger, Seen},
    end_at_once, reset,
    wire::{Dir, End, Pattern, Plan, CHUNK, HEADER_LEN},
    within, Failures,
};

/// Bound on each step that waits for the peer (connect, an exchange, a drain).
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Short connections (churn, half-close, resets, requests) in flight at once, at most.
const SHORT_IN_FLIGHT: usize = 64;
/// Bytes each way of a half-close connection (sizes vary with the id): up to a few hundred
/// KiB, so some are still in flight when the FIN follows them.
const HALF_CLOSE_SIZES: RangeInclusive<u32> = 0..=512 * 1024 - 1;
/// Bytes of a request or an answer after which the connection ends at once.
const AT_ONCE_SIZES: RangeInclusive<u32> = 1..=4096;

/// How much of each kind of traffic to drive.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub idle: usize,
    pub streams: usize,
    /// Bytes per second of each stream, each way.
    pub stream_rate: u32,
    pub slow_readers: usize,
    /// Bytes per second a slow reader reads.
    pub slow_rate: u32,
    pub churn_per_sec: u32,
    /// Half-closes per second, each way round.
    pub half_close_per_sec: u32,
    /// Resets per second, each side.
    pub resets_per_sec: u32,
    /// Connections per second of each way to end at once: the backend answers, then FINs
    /// or resets; the client sends a request, then FINs or resets.
    pub at_once_per_sec: u32,
}

/// The kinds of traffic, each counted apart in the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Stream,
    SlowReader,
    Churn,
    ClientFinFirst,
    BackendFinFirst,
    ClientReset,
    BackendReset,
    AnswerThenFin,
    AnswerThenRst,
    RequestThenFin,
    RequestThenRst,
}

impl Kind {
    /// In the order of their values.
    pub const ALL: [Kind; 12] = [
        Kind::Idle,
        Kind::Stream,
        Kind::SlowReader,
        Kind::Churn,
        Kind::ClientFinFirst,
        Kind::BackendFinFirst,
        Kind::ClientReset,
        Kind::BackendReset,
        Kind::AnswerThenFin,
        Kind::AnswerThenRst,
        Kind::RequestThenFin,
        Kind::RequestThenRst,
    ];

    pub fn from_u8(value: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(value)).copied()
    }

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Stream => "stream",
            Kind::SlowReader => "slow reader",
            Kind::Churn => "churn",
            Kind::ClientFinFirst => "half-close, client FIN first",
            Kind::BackendFinFirst => "half-close, backend FIN first",
            Kind::ClientReset => "client RST after reading",
            Kind::BackendReset => "backend RST after a go byte",
            Kind::AnswerThenFin => "backend answers, then FIN",
            Kind::AnswerThenRst => "backend answers, then RST",
            Kind::RequestThenFin => "client requests, then FIN",
            Kind::RequestThenRst => "client requests, then RST",
        }
    }
}
/// The closure reasons the soak's connections must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Normal,
    ClientReset,
    BackendReset,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Normal, Reason::ClientReset, Reason::BackendReset];

    /// The stats key (`closed.<key>`).
    pub fn key(self) -> &'static str {
        match self {
            Reason::Normal => "normal",
            Reason::ClientReset => "client_reset",
            Reason::BackendReset => "backend_reset",
        }
    }
}

/// Counters the clients keep, read by the 10 s report and the final checks.
#[derive(Default)]
pub struct Counters {
    pub open: AtomicU64,
    pub finished: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    expected: [AtomicU64; 3],
    /// Connections started, by kind.
    run: [AtomicU64; Kind::ALL.len()],
}

impl Counters {
    pub fn expected(&self, reason: Reason) -> u64 {
        self.expected[reason as usize].load(Ordering::Relaxed)
    }

    pub fn run(&self, kind: Kind) -> u64 {
        self.run[kind as usize].load(Ordering::Relaxed)
    }
}

/// Everything a client task needs.
pub struct Clients {
    pub label: &'static str,
    pub addr: SocketAddr,
    pub ledger: Arc<Ledger>,
    pub failures: Arc<Failures>,
    pub counters: Counters,
    next_id: AtomicU64,
    stop: watch::Receiver<bool>,
}

impl Clients {
    pub fn new(
        label: &'static str,
        addr: SocketAddr,
        ledger: Arc<Ledger>,
        failures: Arc<Failures>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            label,
            addr,
            ledger,
            failures,
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
            stop,
        })
    }

    /// Starts every driver of `load`; the set finishes once all connections have ended
    /// after the stop signal.
    pub fn drive(self: &Arc<Self>, load: Load, tasks: &mut JoinSet<()>) {
        for _ in 0..load.idle {
            self.spawn_conn(tasks, Kind::Idle, |c, id, kind| c.idle(id, kind));
        }
        for _ in 0..load.streams {
            self.spawn_conn(tasks, Kind::Stream, move |c, id, kind| {
                c.stream(id, kind, load.stream_rate)
            });
        }
        for _ in 0..load.slow_readers {
            self.spawn_conn(tasks, Kind::SlowReader, move |c, id, kind| {
                c.slow_reader(id, kind, load.slow_rate)
            });
        }
        let short = Arc::new(Semaphore::new(SHORT_IN_FLIGHT));
        let churn = Plan::ClientFinsFirst {
            client: 64,
            backend: 64,
        };
        self.every(
            tasks,
            &short,
            Kind::Churn,
            load.churn_per_sec,
            move |c, id, kind| c.exchange(id, kind, churn),
        );
        let half_close = load.half_close_per_sec;
        self.every(
            tasks,
            &short,
            Kind::ClientFinFirst,
            half_close,
            |c, id, kind| {
                let plan = Plan::ClientFinsFirst {
                    client: size(id, 1, HALF_CLOSE_SIZES),
                    backend: size(id, 2, HALF_CLOSE_SIZES),
                };
                c.exchange(id, kind, plan)
            },
        );
        self.every(
            tasks,
            &short,
            Kind::BackendFinFirst,
            half_close,
            |c, id, kind| {
                let plan = Plan::BackendFinsFirst {
                    client: size(id, 3, HALF_CLOSE_SIZES),
                    backend: size(id, 4, HALF_CLOSE_SIZES),
                };
                c.exchange(id, kind, plan)
            },
        );
        let resets = load.resets_per_sec;
        self.every(tasks, &short, Kind::ClientReset, resets, |c, id, kind| {
            c.client_resets(id, kind)
        });
        self.every(tasks, &short, Kind::BackendReset, resets, |c, id, kind| {
            c.backend_resets(id, kind)
        });
        let at_once = load.at_once_per_sec;
        for (kind, end) in [
            (Kind::AnswerThenFin, End::Close),
            (Kind::AnswerThenRst, End::Reset),
        ] {
            self.every(tasks, &short, kind, at_once, move |c, id, kind| {
                let plan = Plan::Answer {
                    client: size(id, 5, AT_ONCE_SIZES),
                    backend: size(id, 6, AT_ONCE_SIZES),
                    end,
                };
                c.answered(id, kind, plan)
            });
        }
        for (kind, end) in [
            (Kind::RequestThenFin, End::Close),
            (Kind::RequestThenRst, End::Reset),
        ] {
            self.every(tasks, &short, kind, at_once, move |c, id, kind| {
                let plan = Plan::Request {
                    client: size(id, 7, AT_ONCE_SIZES),
                    end,
                };
                c.requested(id, kind, plan)
            });
        }
    }

    /// Runs one connection `conn` of `kind` as a task of its own, counting its outcome.
    fn spawn_conn<F, Fut>(self: &Arc<Self>, tasks: &mut JoinSet<()>, kind: Kind, conn: F)
    where
        F: FnOnce(Arc<Self>, u64, Kind) -> Fut,
        Fut: Future<Output = Result<Reason, String>> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fut = conn(Arc::clone(self), id, kind);
        let this = Arc::clone(self);
        tasks.spawn(async move { this.count(id, kind, fut).await });
    }

    async fn count(&self, id: u64, kind: Kind, conn: impl Future<Output = Result<Reason, String>>) {
        self.counters.run[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        let outcome = conn.await;
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                self.counters.finished.fetch_add(1, Ordering::Relaxed);
                self.counters.expected[reason as usize].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.failures.connection(
                kind,
                id,
                format!("{} client #{id} ({}): {e}", self.label, kind.name()),
            ),
        }
    }

    /// Starts a connection `per_sec` times a second until the stop signal, at most
    /// [`SHORT_IN_FLIGHT`] at once (a stalled proxy slows the soak instead of piling up).
    fn every<F, Fut>(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        in_flight: &Arc<Semaphore>,
        kind: Kind,
        per_sec: u32,
        conn: F,
    ) where
        F: Fn(Arc<Self>, u64, Kind) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Reason, String>> + Send + 'static,
    {
        if per_sec == 0 {
            return;
        }
        let this = Arc::clone(self);
        let in_flight = Arc::clone(in_flight);
        tasks.spawn(async move {
            let mut stop = this.stop.clone();
            let mut tick = interval(Duration::from_secs(1) / per_sec);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break;
                };
                let id = this.next_id.fetch_add(1, Ordering::Relaxed);
                let fut = conn(Arc::clone(&this), id, kind);
                let counter = Arc::clone(&this);
                conns.spawn(async move {
                    counter.count(id, kind, fut).await;
                    drop(permit);
                });
                // Reap finished ones so the set stays small.
                while conns.try_join_next().is_some() {}
            }
            while conns.join_next().await.is_some() {}
        });
    }

    async fn connect(&self, id: u64, kind: Kind, plan: Plan) -> Result<TcpStream, String> {
        let mut stream = within("connect", STEP_LIMIT, TcpStream::connect(self.addr))
            .await?
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        // Some clients end the connection right after their request: it must go out at
        // once, not wait for the header's ACK (Nagle).
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        within(
            "header",
            STEP_LIMIT,
            stream.write_all(&plan.encode(id, kind)),
        )
        .await?
        .map_err(|e| format!("writing the header: {e}"))?;
        self.counters
            .bytes_up
            .fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
        Ok(stream)
    }

    async fn stopped(&self) {
        let mut stop = self.stop.clone();
        // The sender lives until every client is done.
        let _ = stop.wait_for(|s| *s).await;
    }

    /// Held open and silent until the stop signal, then a short exchange, client FIN first.
    async fn idle(self: Arc<Self>, id: u64, kind: Kind) -> Result<Reason, String> {
        let plan = Plan::ClientFinsFirst {
            client: 64,
            backend: 64,
        };
        let stream = self.connect(id, kind, plan).await?;
        self.stopped().await;
        self.finish_exchange(id, plan, stream).await
    }

    /// One exchange: `ClientFinsFirst` (the client then keeps reading) or
    /// `BackendFinsFirst` (the client reads to EOF, then sends).
    async fn exchange(self: Arc<Self>, id: u64, kind: Kind, plan: Plan) -> Result<Reason, String> {
        let stream = self.connect(id, kind, plan).await?;
        self.finish_exchange(id, plan, stream).await
    }

    async fn finish_exchange(
        &self,
        id: u64,
        plan: Plan,
        mut stream: TcpStream,
    ) -> Result<Reason, String> {
        let mut up = Pattern::new(id, Dir::ClientToBackend);
        let mut down = Pattern::new(id, Dir::BackendToClient);
        let (client, backend) = match plan {
            Plan::ClientFinsFirst { client, backend }
            | Plan::BackendFinsFirst { client, backend } => (u64::from(client), u64::from(backend)),
            other => return Err(format!("{other:?} is not an exchange")),
        };
        let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
        let steps = async {
            if matches!(plan, Plan::ClientFinsFirst { .. }) {
                up.send(&mut stream, client).await.map_err(io("sending"))?;
                stream.shutdown().await.map_err(io("FIN"))?;
                down.recv_exact(&mut stream, backend)
                    .await
                    .map_err(io("reading after our FIN"))?;
                down.recv_to_eof(&mut stream)
                    .await
                    .map_err(io("reading to the backend's FIN"))?;
            } else {
                down.recv_exact(&mut stream, backend)
                    .await
                    .map_err(io("reading"))?;
                down.recv_to_eof(&mut stream)
                    .await
                    .map_err(io("reading to the backend's FIN"))?;
                up.send(&mut stream, client)
                    .await
                    .map_err(io("sending after the backend's FIN"))?;
                stream.shutdown().await.map_err(io("FIN"))?;
            }
            Ok::<_, String>(())
        };
        within("the exchange", STEP_LIMIT, steps).await??;
        if down.offset != backend {
            return Err(format!(
                "received {} bytes, the backend sent {backend}",
                down.offset
            ));
        }
        self.counters.bytes_up.fetch_add(client, Ordering::Relaxed);
        self.counters
            .bytes_down
            .fetch_add(backend, Ordering::Relaxed);
        Ok(Reason::Normal)
    }

    /// Sends at `rate` both ways until the stop signal, checking every byte; then FINs,
    /// reads to the backend's FIN and compares counts with the backend's.
    async fn stream(self: Arc<Self>, id: u64, kind: Kind, rate: u32) -> Result<Reason, String> {
        let mut seen = self.ledger.expect(id);
        let stream = self.connect(id, kind, Plan::Stream { rate }).await?;
        let (mut r, mut w) = stream.into_split();
        let mut up = Pattern::new(id, Dir::ClientToBackend);
        let mut down = Pattern::new(id, Dir::BackendToClient);
        let counters = &self.counters;
        let writer = async {
            let mut buf = vec![0; CHUNK];
            let mut tick = pace(CHUNK, rate);
            loop {
                tokio::select! {
                    _ = self.stopped() => break,
                    _ = tick.tick() => {}
                }
                let n = up
                    .send_some(&mut w, &mut buf)
                    .await
                    .map_err(|e| format!("sending: {e}"))?;
                counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
            }
            within("FIN", STEP_LIMIT, w.shutdown())
                .await?
                .map_err(|e| format!("FIN: {e}"))
        };
        let reader = async {
            let mut buf = vec![0; CHUNK];
            loop {
                let n = down
                    .recv_some(&mut r, &mut buf)
                    .await
                    .map_err(|e| format!("reading: {e}"))?;
                if n == 0 {
                    return Ok::<_, String>(());
                }
                counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            }
        };
        // The reader ends at the backend's FIN, which follows ours; bound only that part.
        // A wrong byte ends the connection at once (and is reported then, not at the stop).
        let ended = tokio::try_join!(writer, async {
            tokio::select! {
                read = reader => read,
                _ = async { self.stopped().await; sleep(STEP_LIMIT).await } => {
                    Err(format!("no FIN from the backend {STEP_LIMIT:?} after the stop"))
                }
            }
        });
        if let Err(e) = ended {
            // Whether bytes went missing or only the FIN did.
            return Err(format!(
                "{e} (client sent {} and received {}; backend {:?})",
                up.offset,
                down.offset,
                seen.try_recv().ok()
            ));
        }
        compare_seen(seen, up.offset, down.offset)
    }

    /// Sends nothing and reads `rate` bytes a second while the backend writes as fast as it
    /// can; at the stop signal FINs and reads the rest at full speed.
    async fn slow_reader(
        self: Arc<Self>,
        id: u64,
        kind: Kind,
        rate: u32,
    ) -> Result<Reason, String> {
        let seen = self.ledger.expect(id);
        let mut stream = self.connect(id, kind, Plan::Stream { rate: 0 }).await?;
        let mut down = Pattern::new(id, Dir::BackendToClient);
        const READ: usize = 4096;
        let mut buf = vec![0; READ];
        let mut tick = pace(READ, rate);
        loop {
            tokio::select! {
                _ = self.stopped() => break,
                _ = tick.tick() => {}
            }
            let n = within(
                "a slow read",
                STEP_LIMIT,
                down.recv_some(&mut stream, &mut buf),
            )
            .await?
            .map_err(|e| format!("reading: {e}"))?;
            if n == 0 {
                return Err("EOF before the stop".to_owned());
            }
            self.counters
                .bytes_down
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let before = down.offset;
        within("FIN", STEP_LIMIT, stream.shutdown())
            .await?
            .map_err(|e| format!("FIN: {e}"))?;
        within(
            "reading the rest",
            STEP_LIMIT,
            down.recv_to_eof(&mut stream),
        )
        .await?
        .map_err(|e| format!("reading the rest: {e}"))?;
        self.counters
            .bytes_down
            .fetch_add(down.offset - before, Ordering::Relaxed);
        compare_seen(seen, 0, down.offset)
    }

    /// Reads what the backend sends (so the connection is up end to end), then resets.
    async fn client_resets(self: Arc<Self>, id: u64, kind: Kind) -> Result<Reason, String> {
        let backend = 4096;
        let mut stream = self
            .connect(id, kind, Plan::ClientResets { backend })
            .await?;
        let mut down = Pattern::new(id, Dir::BackendToClient);
        within(
            "reading",
            STEP_LIMIT,
            down.recv_exact(&mut stream, backend.into()),
        )
        .await?
        .map_err(|e| format!("reading: {e}"))?;
        reset(stream)
            .await
            .map_err(|e| format!("SO_LINGER 0: {e}"))?;
        self.counters
            .bytes_down
            .fetch_add(backend.into(), Ordering::Relaxed);
        Ok(Reason::ClientReset)
    }

    /// Reads what the backend sends, says go, and must then see the backend's RST.
    async fn backend_resets(self: Arc<Self>, id: u64, kind: Kind) -> Result<Reason, String> {
        let backend = 4096;
        let mut stream = self
            .connect(id, kind, Plan::BackendResets { backend })
            .await?;
        let mut down = Pattern::new(id, Dir::BackendToClient);
        let mut up = Pattern::new(id, Dir::ClientToBackend);
        within(
            "reading",
            STEP_LIMIT,
            down.recv_exact(&mut stream, backend.into()),
        )
        .await?
        .map_err(|e| format!("reading: {e}"))?;
        within("go", STEP_LIMIT, up.send(&mut stream, 1))
            .await?
            .map_err(|e| format!("sending go: {e}"))?;
        expect_reset(&mut stream, &mut down).await?;
        self.counters.bytes_up.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_down
            .fetch_add(backend.into(), Ordering::Relaxed);
        Ok(Reason::BackendReset)
    }

    /// Sends a request without a FIN; the backend reads it, answers and at once ends the
    /// connection as `end` says. The whole answer must arrive, then that end: EOF (the
    /// client then closes too) or the RST.
    async fn answered(self: Arc<Self>, id: u64, kind: Kind, plan: Plan) -> Result<Reason, String> {
        let Plan::Answer {
            client,
            backend,
            end,
        } = plan
        else {
            return Err(format!("{plan:?} is not an answer"));
        };
        let mut stream = self.connect(id, kind, plan).await?;
        let mut up = Pattern::new(id, Dir::ClientToBackend);
        let mut down = Pattern::new(id, Dir::BackendToClient);
        within(
            "the request",
            STEP_LIMIT,
            up.send(&mut stream, client.into()),
        )
        .await?
        .map_err(|e| format!("sending the request: {e}"))?;
        let ending = read_until_closed(&mut stream, &mut down).await;
        let (want, reason) = expected_end(end, Reason::BackendReset);
        if down.offset != u64::from(backend) || ending != want {
            return Err(format!(
                "{ending} after {} of the {backend} answer bytes, expected {want} after all \
                 of them",
                down.offset,
            ));
        }
        self.counters
            .bytes_up
            .fetch_add(client.into(), Ordering::Relaxed);
        self.counters
            .bytes_down
            .fetch_add(backend.into(), Ordering::Relaxed);
        // Dropping `stream` answers the backend's FIN with ours (after an RST, sends nothing).
        Ok(reason)
    }

    /// Sends a request and at once ends the connection as `end` says; the backend must
    /// read every request byte, then that end.
    async fn requested(self: Arc<Self>, id: u64, kind: Kind, plan: Plan) -> Result<Reason, String> {
        let Plan::Request { client, end } = plan else {
            return Err(format!("{plan:?} is not a request"));
        };
        let seen = self.ledger.expect(id);
        let mut stream = self.connect(id, kind, plan).await?;
        let mut up = Pattern::new(id, Dir::ClientToBackend);
        within(
            "the request",
            STEP_LIMIT,
            up.send(&mut stream, client.into()),
        )
        .await?
        .map_err(|e| format!("sending the request: {e}"))?;
        end_at_once(stream, end)
            .await
            .map_err(|e| format!("ending: {e}"))?;
        // The backend reports on every connection whose header it reads.
        let seen = within("the backend's report", STEP_LIMIT, seen)
            .await
            .map_err(|_| {
                format!(
                    "no report from the backend within {STEP_LIMIT:?}: it did not read this \
                     connection's header, so none of the {client} request bytes reached it"
                )
            })?
            .map_err(|_| "the backend ended without a report".to_owned())?;
        let (want, reason) = expected_end(end, Reason::ClientReset);
        if seen.received != u64::from(client) || seen.end != want {
            return Err(format!(
                "the backend read {} after {} of the {client} request bytes, expected {want} \
                 after all of them",
                seen.end, seen.received,
            ));
        }
        self.counters
            .bytes_up
            .fetch_add(client.into(), Ordering::Relaxed);
        Ok(reason)
    }
}

/// What the peer must read when a side ends at once with `end`, and the closure reason
/// the proxy must record (`reset` when it is an RST).
fn expected_end(end: End, reset: Reason) -> (Ending, Reason) {
    match end {
        End::Close => (Ending::Eof, Reason::Normal),
        End::Reset => (Ending::Reset, reset),
    }
}

/// The stream's counts as the backend reported them before its FIN, against the client's.
fn compare_seen(
    mut seen: oneshot::Receiver<Seen>,
    sent: u64,
    received: u64,
) -> Result<Reason, String> {
    let theirs = seen
        .try_recv()
        .map_err(|_| "the backend FINed without reporting its counts".to_owned())?;
    if (theirs.received, theirs.sent) != (sent, received) {
        return Err(format!(
            "byte counts differ: client sent {sent} and received {received}, \
             backend received {} and sent {}",
            theirs.received, theirs.sent
        ));
    }
    Ok(Reason::Normal)
}

/// A size from `range` for connection `id`: the same on every run, different for each
/// `salt`.
fn size(id: u64, salt: u64, range: RangeInclusive<u32>) -> u32 {
    let x = (id ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    let span = u64::from(range.end() - range.start()) + 1;
    range.start() + u32::try_from(x % span).unwrap_or(0)
}

/// Ticks once per `chunk` bytes at `rate` bytes a second; a late tick delays the next.
fn pace(chunk: usize, rate: u32) -> tokio::time::Interval {
    let mut tick = interval(Duration::from_secs_f64(
        chunk as f64 / f64::from(rate.max(1)),
    ));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}
