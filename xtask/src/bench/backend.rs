//! The backend every target forwards to: a server on 127.0.0.1 inside the xtask process that
//! sinks uploads, sources downloads, does both at once and echoes messages (see
//! [`super::wire`]).
//!
//! Echo connections (request/response, churn, idle, upgrade) are tokio tasks, so 10,000 idle ones cost
//! no threads. Bulk connections leave tokio for a blocking thread each: a plain read/write
//! loop times its waits without any scheduler in between.

use std::{
    io::{self, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
    runtime::Runtime,
};

use super::wire::{self, Got, ReadWaits, Request, UploadReply, CHUNK, HEADER_LEN, READ_POLL};

/// A connection that sends no complete header within this is dropped (e.g. a readiness probe).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a bulk connection may live; a stuck target fails the run instead of hanging it.
const BULK_LIMIT: Duration = Duration::from_secs(600);
/// Pending connections the listener queues: churn and idle connect in bursts.
const BACKLOG: u32 = 4096;

/// The running backend; dropping it stops the server.
pub struct Backend {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    runtime: Option<Runtime>,
}

impl Backend {
    pub fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-backend")
            .enable_all()
            .build()
            .context("failed to start the backend's tokio runtime")?;
        let listener = runtime.block_on(async {
            let socket = TcpSocket::new_v4().context("backend: socket() failed")?;
            socket
                .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .context("backend: bind 127.0.0.1:0 failed")?;
            socket.listen(BACKLOG).context("backend: listen() failed")
        })?;
        let addr = listener
            .local_addr()
            .context("backend: getsockname failed")?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        runtime.spawn(async move {
            // Runs until the runtime is dropped with the Backend.
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, Arc::clone(&counter)));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        eprintln!("bench: backend accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self {
            addr,
            sent,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes all downloads and duplex streams so far have handed to the kernel (`write()`
    /// returned them).
    pub fn sent(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sent)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// One connection: read the header, then serve what it asks for. Errors end the connection
/// quietly: a peer that resets (the slow reader closes with unread data) is expected, and the
/// load generator checks byte counts itself.
async fn serve(mut stream: tokio::net::TcpStream, sent: Arc<AtomicU64>) {
    let mut header = [0; HEADER_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) | Err(_) => return,
    }
    let Some(request) = Request::decode(&header) else {
        return;
    };
    match request {
        Request::Echo(size) => {
            let _ = echo(stream, size).await;
        }
        Request::EchoOnce(size) => {
            // Dropping the stream after the reply closes it: the backend's FIN comes first.
            let _ = echo_once(stream, size).await;
        }
        Request::Upload | Request::Download(_) | Request::Duplex(_) => {
            let blocking = match stream.into_std() {
                Ok(s) => s,
                Err(_) => return,
            };
            let spawned = thread::Builder::new()
                .name("bench-bulk".into())
                .spawn(move || {
                    let _ = match request {
                        Request::Download(bytes) => source(blocking, bytes, &sent),
                        Request::Duplex(bytes) => duplex(blocking, bytes, sent),
                        _ => sink(blocking),
                    };
                });
            if let Err(e) = spawned {
                eprintln!("bench: backend cannot spawn a bulk thread: {e}");
            }
        }
    }
}

async fn echo(mut stream: tokio::net::TcpStream, size: u64) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut message = vec![0; usize::try_from(size).unwrap_or(wire::MAX_ECHO as usize)];
    // Ends at the client's EOF (or any error); idle connections wait here.
    loop {
        match stream.read_exact(&mut message).await {
            Ok(_) => stream.write_all(&message).await?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

async fn echo_once(mut stream: tokio::net::TcpStream, size: u64) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut message = vec![0; usize::try_from(size).unwrap_or(wire::MAX_ECHO as usize)];
    stream.read_exact(&mut message).await?;
    stream.write_all(&message).await
}

/// Upload: read to EOF, then report the count and the longest read wait.
fn sink(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let reply = read_to_eof(&mut stream, Instant::now() + BULK_LIMIT)?;
    stream.write_all(&reply.encode())?;
    stream.shutdown(Shutdown::Write)
}

/// Reads until EOF: the count and the longest read wait, as an upload's reply says them.
fn read_to_eof(stream: &mut TcpStream, deadline: Instant) -> io::Result<UploadReply> {
    stream.set_read_timeout(Some(READ_POLL))?;
    let mut buf = vec![0; CHUNK];
    let mut waits = ReadWaits::default();
    let mut received = 0u64;
    loop {
        match wire::read_timed(stream, &mut buf, &mut waits, deadline)? {
            Got::Data(n) => received += n as u64,
            Got::Eof => break,
            Got::Deadline => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(UploadReply {
        received,
        longest_wait: waits.longest,
        longest_after: waits.longest_after,
    })
}

/// Download: send `bytes` (adding each write to `sent`), shut down the write side, wait for the
/// client to close.
fn source(mut stream: TcpStream, bytes: u64, sent: &AtomicU64) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + BULK_LIMIT;
    send(&mut stream, bytes, sent, deadline)?;
    stream.shutdown(Shutdown::Write)?;
    stream.set_read_timeout(Some(READ_POLL))?;
    let mut sink = vec![0; 4096];
    let mut waits = ReadWaits::default();
    while let Got::Data(_) = wire::read_timed(&mut stream, &mut sink, &mut waits, deadline)? {}
    Ok(())
}

/// Both ways: sends `bytes` on a thread of its own while it reads to EOF, then answers
/// with what it read, after its own bytes, and shuts down its write side.
fn duplex(mut stream: TcpStream, bytes: u64, sent: Arc<AtomicU64>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + BULK_LIMIT;
    let mut writer = stream.try_clone()?;
    let sending = thread::Builder::new()
        .name("bench-duplex-backend".into())
        .spawn(move || send(&mut writer, bytes, &sent, deadline))?;
    let reply = read_to_eof(&mut stream, deadline);
    if reply.is_err() {
        // The writer's next write fails at once.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let written = sending
        .join()
        .map_err(|_| io::Error::other("the sending thread panicked"));
    let reply = reply?;
    written??;
    stream.write_all(&reply.encode())?;
    stream.shutdown(Shutdown::Write)
}

/// Writes `bytes`, adding each write to `sent`.
fn send(stream: &mut TcpStream, bytes: u64, sent: &AtomicU64, deadline: Instant) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let buf = vec![0x5a; CHUNK];
    let mut left = bytes;
    while left > 0 {
        if Instant::now() >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        // write() rather than write_all(): count every byte the kernel took, also when a
        // later write of the chunk fails (the slow reader resets).
        let written = match stream.write(&buf[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sent.fetch_add(written as u64, Ordering::Relaxed);
        left -= written as u64;
    }
    Ok(())
}
