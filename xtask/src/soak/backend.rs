//! The soak backend: a tokio server on 127.0.0.1 that does what each connection's header
//! asks ([`Plan`]), checks every byte it receives, and reports what it finds to the
//! [`Ledger`] (what it saw where the client gives the verdict) or [`Failures`].

use std::{
    collections::HashMap,
    fmt, io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt as _,
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
    time::{interval, MissedTickBehavior},
};

use super::{
    end_at_once, reset,
    wire::{Dir, Pattern, Plan, CHUNK, HEADER_LEN},
    within, Failures,
};

/// What the backend saw on a connection whose client gives the verdict: a stream (the
/// client compares counts) or a request the client ended at once (it cannot read anything
/// after that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub received: u64,
    pub sent: u64,
    /// How the client's side ended, as the backend read it.
    pub end: Ending,
}

/// How reading a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Eof,
    Reset,
    /// Anything else: a wrong byte, another error, nothing for too long.
    Failed(String),
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Eof => f.write_str("a FIN (EOF)"),
            Ending::Reset => f.write_str("an RST"),
            Ending::Failed(e) => f.write_str(e),
        }
    }
}

/// The backend's [`Seen`] by connection id: the client asks for it before it connects,
/// the backend sends it before its FIN (or once it has read the client's end).
#[derive(Default)]
pub struct Ledger(Mutex<HashMap<u64, oneshot::Sender<Seen>>>);

impl Ledger {
    /// Where the backend's report on connection `id` will arrive. A connection that never
    /// reaches the backend leaves its entry here, which only a failed run has.
    pub fn expect(&self, id: u64) -> oneshot::Receiver<Seen> {
        let (tx, rx) = oneshot::channel();
        self.0
            .lock()
            .expect("no holder of the ledger lock panics")
            .insert(id, tx);
        rx
    }

    fn report(&self, id: u64, seen: Seen) {
        let waiting = self
            .0
            .lock()
            .expect("no holder of the ledger lock panics")
            .remove(&id);
        // A client that has given up has dropped its receiver; its failure is counted.
        if let Some(tx) = waiting {
            let _ = tx.send(seen);
        }
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
                            serve(label, stream, &ledger, &failures).await;
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

/// Serves one connection; a failure counts against the connection's kind once the header
/// names it.
async fn serve(label: &str, mut stream: TcpStream, ledger: &Ledger, failures: &Failures) {
    let mut header = [0; HEADER_LEN];
    let read = within("the header", HEADER_LIMIT, stream.read_exact(&mut header)).await;
    let decoded = match read {
        Ok(Ok(_)) => Plan::decode(&header).ok_or_else(|| format!("unknown header {header:?}")),
        Ok(Err(e)) => Err(format!("reading the header: {e}")),
        Err(e) => Err(e),
    };
    match decoded {
        Ok((id, kind, plan)) => {
            if let Err(e) = follow(stream, id, plan, ledger).await {
                failures.connection(kind, id, format!("{label} backend: #{id} {plan:?}: {e}"));
            }
        }
        Err(e) => failures.push(format!("{label} backend: {e}")),
    }
}

/// Does what `plan` asks on connection `id`, whose header has been read.
async fn follow(mut stream: TcpStream, id: u64, plan: Plan, ledger: &Ledger) -> Result<(), String> {
    let fail = |what: &str, e: io::Error| format!("{what}: {e}");
    let mut up = Pattern::new(id, Dir::ClientToBackend);
    let mut down = Pattern::new(id, Dir::BackendToClient);
    match plan {
        Plan::ClientFinsFirst { client, backend } => {
            up.recv_to_eof(&mut stream)
                .await
                .map_err(|e| fail("reading the client's bytes", e))?;
            expect_count(up.offset, client)?;
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
            expect_count(up.offset, client)?;
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
            ledger.report(
                id,
                Seen {
                    received: up.offset,
                    sent: down.offset,
                    end: Ending::Eof,
                },
            );
            w.shutdown().await.map_err(|e| fail("FIN", e))?;
        }
        Plan::ClientResets { backend } => {
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            expect_reset(&mut stream, &mut up).await?;
        }
        Plan::BackendResets { backend } => {
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending", e))?;
            up.recv_exact(&mut stream, 1)
                .await
                .map_err(|e| fail("waiting for the go byte", e))?;
            reset(stream).await.map_err(|e| fail("SO_LINGER 0", e))?;
        }
        Plan::Answer {
            client,
            backend,
            end,
        } => {
            up.recv_exact(&mut stream, client.into())
                .await
                .map_err(|e| fail("reading the request", e))?;
            down.send(&mut stream, backend.into())
                .await
                .map_err(|e| fail("sending the answer", e))?;
            end_at_once(stream, end)
                .await
                .map_err(|e| fail("ending", e))?;
        }
        Plan::Request { .. } => {
            let end = read_until_closed(&mut stream, &mut up).await;
            ledger.report(
                id,
                Seen {
                    received: up.offset,
                    sent: 0,
                    end,
                },
            );
            // Dropping the stream sends our FIN (the client's end, if a FIN, was read).
        }
    }
    Ok(())
}

fn expect_count(got: u64, want: u32) -> Result<(), String> {
    if got == u64::from(want) {
        Ok(())
    } else {
        Err(format!(
            "received {got} bytes before EOF, the client sent {want}"
        ))
    }
}

/// Reads and checks until the connection ends, and says how it ended.
pub async fn read_until_closed(stream: &mut TcpStream, pattern: &mut Pattern) -> Ending {
    let mut buf = vec![0; CHUNK];
    let read = within("the end of the connection", HEADER_LIMIT, async {
        loop {
            match pattern.recv_some(stream, &mut buf).await {
                Ok(0) => return Ending::Eof,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ending::Reset,
                Err(e) => return Ending::Failed(e.to_string()),
            }
        }
    })
    .await;
    read.unwrap_or_else(Ending::Failed)
}

/// Reads until the connection is reset (what the proxy must pass on from a client RST).
pub async fn expect_reset(stream: &mut TcpStream, pattern: &mut Pattern) -> Result<(), String> {
    match read_until_closed(stream, pattern).await {
        Ending::Reset => Ok(()),
        other => Err(format!("{other} instead of an RST")),
    }
}
