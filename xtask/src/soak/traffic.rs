//! The soak's clients: long-lived idle connections, rate-bounded streams both ways, slow
//! readers, half-closes either way round, churn and resets, all through one proxy until
//! told to stop. Each finished connection counts the closure reason the proxy must record
//! for it; anything unexpected is a failure.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{watch, Semaphore},
    task::JoinSet,
    time::{interval, sleep, MissedTickBehavior},
};

use super::{
    backend::{expect_reset, Ledger, StreamCounts},
    wire::{Dir, Pattern, Plan, CHUNK, HEADER_LEN},
    within, Failures,
};

/// Bound on each step that waits for the peer (connect, an exchange, a drain).
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// Short connections (churn, half-close, resets) in flight at once, at most.
const SHORT_IN_FLIGHT: usize = 64;

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
}

impl Counters {
    pub fn expected(&self, reason: Reason) -> u64 {
        self.expected[reason as usize].load(Ordering::Relaxed)
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
            self.spawn_conn(tasks, |c, id| c.idle(id));
        }
        for _ in 0..load.streams {
            self.spawn_conn(tasks, move |c, id| c.stream(id, load.stream_rate));
        }
        for _ in 0..load.slow_readers {
            self.spawn_conn(tasks, move |c, id| c.slow_reader(id, load.slow_rate));
        }
        // Sizes vary with the id: from nothing to a few hundred KiB, so some are still in
        // flight when the FIN follows them.
        let size = |id: u64, salt: u64| {
            let x = (id ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 45;
            u32::try_from(x % (512 * 1024)).unwrap_or(0)
        };
        let short = Arc::new(Semaphore::new(SHORT_IN_FLIGHT));
        self.every(tasks, &short, load.churn_per_sec, |c, id| {
            c.exchange(
                id,
                Plan::ClientFinsFirst {
                    client: 64,
                    backend: 64,
                },
            )
        });
        self.every(tasks, &short, load.half_close_per_sec, move |c, id| {
            c.exchange(
                id,
                Plan::ClientFinsFirst {
                    client: size(id, 1),
                    backend: size(id, 2),
                },
            )
        });
        self.every(tasks, &short, load.half_close_per_sec, move |c, id| {
            c.exchange(
                id,
                Plan::BackendFinsFirst {
                    client: size(id, 3),
                    backend: size(id, 4),
                },
            )
        });
        self.every(tasks, &short, load.resets_per_sec, |c, id| {
            c.client_resets(id)
        });
        self.every(tasks, &short, load.resets_per_sec, |c, id| {
            c.backend_resets(id)
        });
    }

    /// Runs one connection `conn` as a task of its own, counting its outcome.
    fn spawn_conn<F, Fut>(self: &Arc<Self>, tasks: &mut JoinSet<()>, conn: F)
    where
        F: FnOnce(Arc<Self>, u64) -> Fut,
        Fut: Future<Output = Result<Reason, String>> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fut = conn(Arc::clone(self), id);
        let this = Arc::clone(self);
        tasks.spawn(async move { this.count(id, fut).await });
    }

    async fn count(&self, id: u64, conn: impl Future<Output = Result<Reason, String>>) {
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        let outcome = conn.await;
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(reason) => {
                self.counters.finished.fetch_add(1, Ordering::Relaxed);
                self.counters.expected[reason as usize].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self
                .failures
                .push(format!("{} client #{id}: {e}", self.label)),
        }
    }

    /// Starts a connection `per_sec` times a second until the stop signal, at most
    /// [`SHORT_IN_FLIGHT`] at once (a stalled proxy slows the soak instead of piling up).
    fn every<F, Fut>(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        in_flight: &Arc<Semaphore>,
        per_sec: u32,
        conn: F,
    ) where
        F: Fn(Arc<Self>, u64) -> Fut + Send + 'static,
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
                let fut = conn(Arc::clone(&this), id);
                let counter = Arc::clone(&this);
                conns.spawn(async move {
                    counter.count(id, fut).await;
                    drop(permit);
                });
                // Reap finished ones so the set stays small.
                while conns.try_join_next().is_some() {}
            }
            while conns.join_next().await.is_some() {}
        });
    }

    async fn connect(&self, id: u64, plan: Plan) -> Result<TcpStream, String> {
        let mut stream = within("connect", STEP_LIMIT, TcpStream::connect(self.addr))
            .await?
            .map_err(|e| format!("connect to {}: {e}", self.addr))?;
        within("header", STEP_LIMIT, stream.write_all(&plan.encode(id)))
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
    async fn idle(self: Arc<Self>, id: u64) -> Result<Reason, String> {
        let plan = Plan::ClientFinsFirst {
            client: 64,
            backend: 64,
        };
        let stream = self.connect(id, plan).await?;
        self.stopped().await;
        self.finish_exchange(id, plan, stream).await
    }

    /// One exchange: `ClientFinsFirst` (the client then keeps reading) or
    /// `BackendFinsFirst` (the client reads to EOF, then sends).
    async fn exchange(self: Arc<Self>, id: u64, plan: Plan) -> Result<Reason, String> {
        let stream = self.connect(id, plan).await?;
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
    async fn stream(self: Arc<Self>, id: u64, rate: u32) -> Result<Reason, String> {
        let stream = self.connect(id, Plan::Stream { rate }).await?;
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
                self.ledger.take(id)
            ));
        }
        self.compare_ledger(id, up.offset, down.offset)
    }

    /// Sends nothing and reads `rate` bytes a second while the backend writes as fast as it
    /// can; at the stop signal FINs and reads the rest at full speed.
    async fn slow_reader(self: Arc<Self>, id: u64, rate: u32) -> Result<Reason, String> {
        let mut stream = self.connect(id, Plan::Stream { rate: 0 }).await?;
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
        self.compare_ledger(id, 0, down.offset)
    }

    fn compare_ledger(&self, id: u64, sent: u64, received: u64) -> Result<Reason, String> {
        let theirs = self
            .ledger
            .take(id)
            .ok_or_else(|| "the backend FINed without reporting its counts".to_owned())?;
        let ours = StreamCounts {
            received: sent,
            sent: received,
        };
        if theirs != ours {
            return Err(format!(
                "byte counts differ: client sent {sent} and received {received}, \
                 backend received {} and sent {}",
                theirs.received, theirs.sent
            ));
        }
        Ok(Reason::Normal)
    }

    /// Reads what the backend sends (so the connection is up end to end), then resets.
    async fn client_resets(self: Arc<Self>, id: u64) -> Result<Reason, String> {
        let backend = 4096;
        let mut stream = self.connect(id, Plan::ClientResets { backend }).await?;
        let mut down = Pattern::new(id, Dir::BackendToClient);
        within(
            "reading",
            STEP_LIMIT,
            down.recv_exact(&mut stream, backend.into()),
        )
        .await?
        .map_err(|e| format!("reading: {e}"))?;
        super::reset(stream).map_err(|e| format!("SO_LINGER 0: {e}"))?;
        self.counters
            .bytes_down
            .fetch_add(backend.into(), Ordering::Relaxed);
        Ok(Reason::ClientReset)
    }

    /// Reads what the backend sends, says go, and must then see the backend's RST.
    async fn backend_resets(self: Arc<Self>, id: u64) -> Result<Reason, String> {
        let backend = 4096;
        let mut stream = self.connect(id, Plan::BackendResets { backend }).await?;
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
}

/// Ticks once per `chunk` bytes at `rate` bytes a second; a late tick delays the next.
fn pace(chunk: usize, rate: u32) -> tokio::time::Interval {
    let mut tick = interval(Duration::from_secs_f64(
        chunk as f64 / f64::from(rate.max(1)),
    ));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}
