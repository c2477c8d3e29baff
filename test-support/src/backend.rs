//! Mock backends on loopback: [`Backend`] runs a handler per connection on the test's
//! runtime and hands its panics to the test; [`background_backend`] runs one for a test
//! without a runtime (the binary's tests).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::wait::WAIT;

/// A mock backend on loopback: runs `handler` for every accepted connection. Its panics
/// are handed to the test by [`Backend::join`].
pub struct Backend {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    pub async fn spawn<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Backend::spawn_at("127.0.0.1:0".parse().expect("an address"), handler).await
    }

    /// [`Backend::spawn`] on `addr`: a target that was dead comes back.
    pub async fn spawn_at<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind a backend on {addr}: {e}"));
        let addr = listener.local_addr().expect("backend address");
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let handlers = Arc::clone(&handlers);
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let task = tokio::spawn(handler(stream));
                    handlers.lock().expect("backend handler list").push(task);
                }
            }
        });
        Backend {
            addr,
            accept,
            handlers,
        }
    }

    /// [`Backend::spawn`] with a value (a payload, a [`tokio::sync::Notify`], a counter)
    /// that each handler gets a clone of.
    pub async fn spawn_with<S, F, Fut>(state: S, handler: F) -> Backend
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(TcpStream, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Backend::spawn(move |stream| handler(stream, state.clone())).await
    }

    /// A backend that, on each connection, first echoes [`GREETING`] (the round trip that
    /// proves a connection established and spliced), then runs `script`. A script that
    /// ends the connection on its own (a reset, a close) should wait for a word from the
    /// client first: the connection must still be there when the test looks it up.
    pub async fn greeted<F, Fut>(script: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let script = Arc::new(script);
        Backend::spawn(move |mut stream| {
            let script = Arc::clone(&script);
            async move {
                let mut greeting = [0u8; GREETING.len()];
                stream
                    .read_exact(&mut greeting)
                    .await
                    .expect("backend reads the greeting");
                assert_eq!(greeting, GREETING, "the greeting at the backend");
                stream
                    .write_all(GREETING)
                    .await
                    .expect("backend echoes the greeting");
                script(stream).await;
            }
        })
        .await
    }

    /// [`Backend::greeted`] with a value each script gets a clone of.
    pub async fn greeted_with<S, F, Fut>(state: S, script: F) -> Backend
    where
        S: Clone + Send + Sync + 'static,
        F: Fn(TcpStream, S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Backend::greeted(move |stream| script(stream, state.clone())).await
    }

    /// Waits for every handler to end; a handler's panic fails the test here.
    pub async fn join(self) {
        self.accept.abort();
        let handlers = std::mem::take(&mut *self.handlers.lock().expect("backend handler list"));
        for handler in handlers {
            match tokio::time::timeout(WAIT, handler).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(Err(e)) => panic!("backend handler failed: {e}"),
                Err(_) => panic!("a backend handler did not finish in time"),
            }
        }
    }
}

/// What a [`Backend::greeted`] backend echoes first.
pub const GREETING: &[u8] = b"splice first";

/// Sends back every byte `stream` gets, then its FIN after the peer's.
pub async fn try_echo(stream: TcpStream) -> io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

/// A mock backend handler: [`try_echo`], where an error fails the test.
pub async fn echo(stream: TcpStream) {
    try_echo(stream).await.expect("echo");
}

/// A [`Backend`] for a test without a runtime: it runs `handler` on a thread and runtime
/// of its own for the rest of the test process, and nobody joins it (a binary test ends
/// its proxy by killing it, which resets connections mid-echo).
pub fn background_backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (started, addr) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async move {
            let backend = Backend::spawn(handler).await;
            started
                .send(backend.addr)
                .expect("the test awaits the address");
            std::future::pending::<()>().await;
        });
    });
    addr.recv().expect("the background backend starts")
}

/// A background backend that echoes every connection until EOF, then closes its side.
pub fn echo_backend() -> SocketAddr {
    background_backend(|stream| async move {
        let _ = try_echo(stream).await;
    })
}

/// A background backend that sends `tag` (one byte) on every connection, then echoes.
pub fn tagged_backend(tag: u8) -> SocketAddr {
    background_backend(move |mut stream| async move {
        if stream.write_all(&[tag]).await.is_ok() {
            let _ = try_echo(stream).await;
        }
    })
}
