//! The soak backend: a tokio server on 127.0.0.1 that does what each connection's header
//! asks ([`Plan`]), checks every byte it receives, and reports what it finds to the
//! [`Ledger`] (stream counts) or [`Failures`].

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt as _,
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::{interval, MissedTickBehavior},
};

use super::{
    wire::{Dir, Pattern, Plan, CHUNK, HEADER_LEN},
    within, Failures,
};

/// What the backend counted on a [`Plan::Stream`] connection, for the client to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCounts {
    pub received: u64,
    pub sent: u64,
}

/// Stream counts by connection id: the backend puts them before its FIN, the client takes
/// them after reading that FIN.
#[derive(Default)]
pub struct Ledger(Mutex<HashMap<u64, StreamCounts>>);

impl Ledger {
    fn put(&self, id: u64, counts: StreamCounts) {
        self.0
            .lock()
            .expect("no holder of the ledger lock panics")
            .insert(id, counts);
    }

    pub fn take(&self, id: u64) -> Option<StreamCounts> {
        self.0
            .lock()
            .expect("no holder of the ledger lock panics")
            .remove(&id)
    }
}

pub struct Backend {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Backend {
    pub async fn start(
        label: &'static str,
        ledger: Arc<Ledger>,
        failures: Arc<Failures>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let ledger = Arc::clone(&ledger);
                        let failures = Arc::clone(&failures);
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream, &ledger).await {
                                failures.push(format!("{label} backend: {e}"));
                            }
                        });
                    }
                    Err(e) => {
                        failures.push(format!("{label} backend: accept failed: {e}"));
                        // EMFILE and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Self { addr, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How long the header may take to arrive.
const HEADER_LIMIT: Duration = Duration::from_secs(30);

async fn serve(mut stream: TcpStream, ledger: &Ledger) -> Result<(), String> {
    let mut header = [0; HEADER_LEN];
    within("the header", HEADER_LIMIT, stream.read_exact(&mut header))
        .await?
        .map_err(|e| format!("reading the header: {e}"))?;
    let (id, plan) =
        Plan::decode(&header).ok_or_else(|| format!("unknown plan in header {header:?}"))?;
    let fail = |what: &str, e: io::Error| format!("#{id} {plan:?}: {what}: {e}");
    let mut up = Pattern::new(id, Dir::ClientToBackend);
    let mut down = Pattern::new(id, Dir::BackendToClient);
    match plan {
        Plan::ClientFinsFirst { client, backend } => {
            up.recv_to_eof(&mut stream)
                .await
                .map_err(|e| fail("reading the client's bytes", e))?;
            expect_count(id, plan, up.offset, client)?;
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            stream.shutdown().await.map_err(|e| fail("FIN", e))?;
        }
        Plan::BackendFinsFirst { client, backend } => {
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            stream.shutdown().await.map_err(|e| fail("FIN", e))?;
            up.recv_to_eof(&mut stream)
                .await
                .map_err(|e| fail("reading the client's bytes after our FIN", e))?;
            expect_count(id, plan, up.offset, client)?;
        }
        Plan::Stream { rate } => {
            let (mut r, mut w) = stream.into_split();
            let (eof_tx, mut eof_rx) = watch::channel(false);
            let reader = async {
                let result = up.recv_to_eof(&mut r).await;
                let _ = eof_tx.send(true);
                result
            };
            let writer = async {
                let mut buf = vec![0; CHUNK];
                // Rate 0: as fast as the client takes it (a slow reader's backpressure).
                let mut tick = (rate > 0).then(|| {
                    let per_chunk = Duration::from_secs_f64(CHUNK as f64 / f64::from(rate));
                    let mut t = interval(per_chunk);
                    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    t
                });
                loop {
                    tokio::select! {
                        _ = eof_rx.wait_for(|eof| *eof) => return Ok(()),
                        written = async {
                            if let Some(t) = tick.as_mut() {
                                t.tick().await;
                            }
                            down.send_some(&mut w, &mut buf).await
                        } => { written?; }
                    }
                }
            };
            let (read, written) = tokio::join!(reader, writer);
            read.map_err(|e| fail("reading the stream", e))?;
            written.map_err(|e| fail("writing the stream", e))?;
            ledger.put(
                id,
                StreamCounts {
                    received: up.offset,
                    sent: down.offset,
                },
            );
            w.shutdown().await.map_err(|e| fail("FIN", e))?;
        }
        Plan::ClientResets { backend } => {
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            expect_reset(&mut stream, &mut up)
                .await
                .map_err(|e| format!("#{id} {plan:?}: {e}"))?;
        }
        Plan::BackendResets { backend } => {
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            up.recv_exact(&mut stream, 1)
                .await
                .map_err(|e| fail("waiting for the go byte", e))?;
            super::reset(stream).map_err(|e| fail("SO_LINGER 0", e))?;
        }
    }
    Ok(())
}

fn expect_count(id: u64, plan: Plan, got: u64, want: u32) -> Result<(), String> {
    if got == u64::from(want) {
        Ok(())
    } else {
        Err(format!(
            "#{id} {plan:?}: received {got} bytes before EOF, the client sent {want}"
        ))
    }
}

/// Reads until the connection is reset (what the proxy must pass on from a client RST).
pub async fn expect_reset(stream: &mut TcpStream, pattern: &mut Pattern) -> Result<(), String> {
    let mut buf = vec![0; CHUNK];
    let outcome = within("the RST", HEADER_LIMIT, async {
        loop {
            match pattern.recv_some(stream, &mut buf).await {
                Ok(0) => return Err("a FIN (EOF) instead of an RST".to_owned()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("{e} instead of an RST")),
            }
        }
    })
    .await?;
    outcome
}
