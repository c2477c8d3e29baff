//! Test harness: an in-process proxy on loopback, mock backends whose panics reach the
//! test, and [`for_each_data_path`], which runs one test body on each data path.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use sha2::{Digest, Sha256};
use smartproxy::config::{Config, DataPathMode};
use smartproxy::datapath::kernel::MapEntries;
use smartproxy::resolve::{Lookup, Resolve};
use smartproxy::stats::Snapshot;
use smartproxy::vocab::DataPathKind;
use smartproxy::vocab::{Direction, Reason};
use smartproxy::{Closed, Proxy};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

pub mod scenario;
pub mod scrape;
pub mod tls;
pub use scenario::Spliced;
pub use scrape::{counter, gauge, http, sample, scrape};
pub use tls::{for_each_frontend, Client, Frontend};
// One harness for both kinds of tests: what the binary's tests share with these lives
// in `smartproxy-test-support`.
pub use smartproxy_test_support::*;

/// Bounds every wait in a test: a failure, not the wait itself.
pub const WAIT: Duration = Duration::from_secs(20);

/// `[proxy]` lines that park a connection quiet for 200 ms (`smartproxy/src/park/mod.rs`).
pub const PARK_SOON: &str = "park_idle_after = \"200ms\"\n\n";

pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Whether the kernel data path loads here: where it does not, a loud skip of `what`, or
/// a failure with `SMARTPROXY_REQUIRE_EBPF=1` (see [`ebpf_or_skip`]).
pub fn ebpf_loads(what: &str) -> bool {
    ebpf_or_skip(what, smartproxy::datapath::probe_ebpf).is_some()
}

/// Runs `body` once per data path: userspace, ebpf and auto (knobs
/// [`AUTO_SPLICE_AT_FIRST_READ`]: a splice in the middle of each connection). The kernel
/// runs are skipped, loudly, where the kernel path cannot load; with
/// `SMARTPROXY_REQUIRE_EBPF=1` that is a failure.
pub async fn for_each_data_path<F, Fut>(body: F)
where
    F: Fn(DataPathMode) -> Fut,
    Fut: Future<Output = ()>,
{
    init_tracing();
    eprintln!("--- data path: {}", DataPathMode::Userspace);
    body(DataPathMode::Userspace).await;
    if !ebpf_loads("the ebpf and auto data paths of this test") {
        return;
    }
    for mode in [DataPathMode::Ebpf, DataPathMode::Auto] {
        eprintln!("--- data path: {mode}");
        body(mode).await;
    }
}

/// The path a test proxy on `mode` books its plain connections on once they are
/// [`TestProxy::established`]: the kernel on ebpf, and on auto, which the harness runs
/// only where the kernel path loads and with knobs that splice at the first read and
/// stay ([`data_path_lines`]).
pub fn booked_path(mode: DataPathMode) -> DataPathKind {
    match mode {
        DataPathMode::Userspace => DataPathKind::Userspace,
        DataPathMode::Ebpf | DataPathMode::Auto => DataPathKind::Ebpf,
    }
}

/// Whether a test proxy on `mode` puts its plain connections in the kernel maps.
pub fn splices(mode: DataPathMode) -> bool {
    booked_path(mode) == DataPathKind::Ebpf
}

/// The resolver of every test proxy: tests route to IP addresses, and a host name is
/// unknown at once, the way `getaddrinfo` answers one, so that no test ever sends a DNS
/// query (the machine's resolver may be slow, or not there at all).
#[derive(Debug)]
struct NoNames;

impl Resolve for NoNames {
    fn lookup<'a>(&'a self, host: &'a str, _port: u16) -> Lookup<'a> {
        Box::pin(async move {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: unknown name (the test resolver knows none)"),
            ))
        })
    }
}

/// A proxy running in this process, with its own control socket and config file.
pub struct TestProxy {
    pub proxy: Proxy,
    closed: broadcast::Receiver<Closed>,
    mode: DataPathMode,
    /// The `[proxy]` lines that choose the data path ([`data_path_lines`]).
    data_path_lines: String,
    dir: tempfile::TempDir,
}

impl TestProxy {
    /// Starts a proxy on `mode` whose config file is `[proxy]` (data path, a private
    /// control socket) followed by `rest` (`[lifecycle]`, `[[route]]`s). Listen on port 0.
    pub async fn start(mode: DataPathMode, rest: &str) -> TestProxy {
        TestProxy::start_with(mode, data_path_lines(mode), rest).await
    }

    /// [`TestProxy::start`] on `data_path = "auto"` with `knobs` (`auto_*` lines) instead
    /// of the harness's, for the tests of the moves themselves. What
    /// [`TestProxy::established`] and [`TestProxy::assert_kernel_moved`] expect of auto
    /// holds for the harness's knobs only.
    pub async fn start_auto(knobs: &str, rest: &str) -> TestProxy {
        let lines = format!("data_path = \"auto\"\n{knobs}");
        TestProxy::start_with(DataPathMode::Auto, lines, rest).await
    }

    async fn start_with(mode: DataPathMode, data_path_lines: String, rest: &str) -> TestProxy {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config_file = write_config(&dir, &data_path_lines, rest);
        let config = Config::from_file(&config_file).unwrap_or_else(|e| {
            panic!(
                "test config does not load: {e}\n{}",
                config_text(&dir, &data_path_lines, rest)
            )
        });
        let proxy = Proxy::start_with_resolver(config, Arc::new(NoNames))
            .await
            .unwrap_or_else(|e| panic!("proxy does not start: {e}"));
        let closed = proxy.subscribe();
        TestProxy {
            proxy,
            closed,
            mode,
            data_path_lines,
            dir,
        }
    }

    /// Replaces everything after `[proxy]` in the config file with `rest`; the proxy
    /// reads it on its next reload.
    pub fn rewrite_config(&self, rest: &str) {
        write_config(&self.dir, &self.data_path_lines, rest);
    }

    /// Writes `text` verbatim as the config file, `[proxy]` included.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_file(), text).expect("write the test config");
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("smartproxy.toml")
    }

    /// The bound address of `route`'s listener.
    pub fn addr(&self, route: &str) -> SocketAddr {
        self.proxy
            .route_addr(route)
            .unwrap_or_else(|| panic!("no route named {route:?}"))
    }

    pub fn stats(&self) -> Snapshot {
        self.proxy.snapshot()
    }

    /// Waits until `count` of the proxy's connections are parked without a task.
    pub async fn wait_parked(&self, count: u64) {
        wait_for(&format!("{count} idle connection(s) to park"), || {
            self.stats().connections.parked == count
        })
        .await;
    }

    /// A connection to `route` that is past its splice and booked on the proxy's data
    /// path, through a [`Backend::greeted`] backend: [`GREETING`] makes the round trip
    /// first. The kernel refuses to splice a socket that already got its FIN, so a test
    /// that sent its FIN at once would run its kernel variant on the userspace copy.
    pub async fn established(&self, front: &Frontend, route: &str) -> Client {
        let mut client = front.connect(self.addr(route)).await;
        if self.mode == DataPathMode::Auto {
            // On auto the splice comes at the relay's first read, once it found both
            // sockets empty. The greeting's first byte makes it, and the rest waits for
            // it: otherwise a backend that answers and closes at once could close first,
            // and a connection that starts to close stays on the relay.
            let splices = self.stats().ebpf.moves_to_kernel;
            client
                .write_all(&GREETING[..1])
                .await
                .expect("client writes the greeting's first byte");
            wait_for("the splice at the relay's first read", || {
                self.stats().ebpf.moves_to_kernel > splices
            })
            .await;
            client
                .write_all(&GREETING[1..])
                .await
                .expect("client writes the rest of the greeting");
        } else {
            client
                .write_all(GREETING)
                .await
                .expect("client writes the greeting");
        }
        let mut echoed = [0u8; GREETING.len()];
        within("the greeting comes back", client.read_exact(&mut echoed))
            .await
            .expect("client reads the greeting");
        assert_eq!(echoed, GREETING, "the greeting, echoed");
        // On the kernel path the greeting went through the relay (bytes queued before the
        // splice are passed up), and the verdict redirects again only once the relay has
        // told it so, right after its write (`CONTROL.flushed`). The backend's wake-up can
        // preempt the relay between the two, so the echo may come back before: bytes the
        // test sent at once would then be passed too, and a stream that starts then may
        // never go back to the kernel. A pause lets that bookkeeping finish; it bounds
        // nothing and is not measured. On auto the greeting's first byte went through
        // the relay too, and the echo meets the same bookkeeping.
        if splices(self.mode) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The relay books the path before its first byte moves, and again if the splice
        // fails: after a round trip the row is final. On auto it books the splice when it
        // counts the move, which was waited for.
        let local = client
            .tcp()
            .local_addr()
            .expect("client address")
            .to_string();
        let row = self
            .proxy
            .connection_rows()
            .into_iter()
            .find(|row| row.client == local)
            .unwrap_or_else(|| panic!("no connection row for client {local}"));
        assert_eq!(
            row.data_path,
            Some(self.data_path()),
            "data path of connection {} (a failed splice books it on userspace)",
            row.id
        );
        client
    }

    /// The data path this proxy's plain connections must be booked on: the one its test
    /// asked for, not merely the one it runs (a kernel path that failed to load must not
    /// pass for the userspace one).
    fn data_path(&self) -> DataPathKind {
        booked_path(self.mode)
    }

    /// The bytes the kernel moved so far, over every connection of this proxy, by
    /// [`Direction::index`].
    pub fn kernel_bytes(&self) -> [u64; 2] {
        let bytes = self.stats().bytes;
        [
            bytes.kernel_client_to_backend,
            bytes.kernel_backend_to_client,
        ]
    }

    /// Asserts that the kernel moved bytes in `direction` since `before` (a
    /// [`TestProxy::kernel_bytes`] taken after [`TestProxy::established`]) on the kernel
    /// path, and none at all on the userspace path: a kernel variant that reached the
    /// kernel. The first bytes of a connection go through userspace, hence the baseline.
    /// On auto the kernel got them by a move, which the stats count, and the knobs allow
    /// no move back; the fixed paths count no move at all.
    pub fn assert_kernel_moved(&self, before: [u64; 2], direction: Direction) {
        let now = self.kernel_bytes();
        match self.data_path() {
            DataPathKind::Ebpf => assert!(
                now[direction.index()] > before[direction.index()],
                "the kernel moved no {direction} byte after the splice: {before:?} -> {now:?}"
            ),
            DataPathKind::Userspace => {
                assert_eq!(now, [0, 0], "kernel bytes on the userspace data path")
            }
        }
        let ebpf = self.stats().ebpf;
        let moves = (ebpf.moves_to_kernel, ebpf.moves_to_relay);
        if self.mode == DataPathMode::Auto {
            assert!(
                moves.0 >= 1 && moves.1 == 0,
                "auto: (moves to the kernel, moves to the relay) are {moves:?}: the kernel's \
                 bytes came by a move, and one move is all the knobs allow"
            );
        } else {
            assert_eq!(moves, (0, 0), "moves on data_path = \"{}\"", self.mode);
        }
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The next connection that closes.
    pub async fn next_closed(&mut self) -> Closed {
        within("a connection closes", self.closed.recv())
            .await
            .expect("the closed-connection channel keeps up")
    }

    /// Waits for the next connection to close and checks its reason.
    pub async fn expect_closed(&mut self, reason: Reason) -> Closed {
        let closed = self.next_closed().await;
        assert_eq!(
            closed.reason, reason,
            "closure reason of connection {}",
            closed.id
        );
        closed
    }

    /// Asserts that no connection closed since the last [`TestProxy::next_closed`].
    pub fn assert_nothing_closed(&mut self) {
        match self.closed.try_recv() {
            Err(broadcast::error::TryRecvError::Empty) => {}
            Ok(closed) => panic!(
                "connection {} closed unexpectedly, reason {}",
                closed.id, closed.reason
            ),
            Err(e) => panic!("the closed-connection channel: {e}"),
        }
    }

    /// Waits until no connection is left and, with the kernel path loaded, until none of
    /// its four maps holds an entry, counted in the kernel: one left after every connection
    /// closed is a leak.
    pub async fn wait_idle(&self) {
        wait_for("every connection to close", || {
            self.stats().connections.active == 0
        })
        .await;
        if !self.proxy.uses_ebpf() {
            return;
        }
        let mut entries = None;
        let empty = Some(MapEntries::default());
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            entries = self.proxy.map_entries();
            if entries == empty {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("kernel map entries left {WAIT:?} after every connection closed: {entries:?}");
    }

    /// Shuts the proxy down and waits for it to stop.
    pub async fn stop(self) {
        self.proxy.shutdown();
        tokio::time::timeout(WAIT, self.proxy.wait())
            .await
            .expect("the proxy stops in time");
    }
}

fn config_text(dir: &tempfile::TempDir, data_path_lines: &str, rest: &str) -> String {
    let control = dir.path().join("control.sock");
    format!(
        "[proxy]\n{data_path_lines}\ncontrol_socket = {control:?}\n\n{rest}",
        control = control.display().to_string()
    )
}

/// Writes the test config file of a [`TestProxy`] and returns its path.
fn write_config(dir: &tempfile::TempDir, data_path_lines: &str, rest: &str) -> PathBuf {
    let path = dir.path().join("smartproxy.toml");
    std::fs::write(&path, config_text(dir, data_path_lines, rest)).expect("write the test config");
    path
}

/// Ends a connection with FIN both ways (the backend answers the client's FIN with its
/// own, sending nothing more) and checks the proxy saw a normal close.
pub async fn close_normally(proxy: &mut TestProxy, mut stream: TcpStream) {
    stream.shutdown().await.expect("FIN");
    let mut rest = Vec::new();
    within("the backend's FIN", stream.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
    assert!(rest.is_empty(), "unexpected bytes after the FIN");
    proxy.expect_closed(Reason::Normal).await;
}

/// A loopback address whose SYNs go unanswered, for as long as it lives: a listener with
/// backlog 0 whose accept queue is full of connections never accepted, so the kernel
/// drops every further SYN.
pub struct SilentTarget {
    pub addr: SocketAddr,
    _listener: Socket,
    _queued: Vec<std::net::TcpStream>,
}

impl SilentTarget {
    pub fn bind() -> SilentTarget {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("bound address")
            .as_socket()
            .expect("an IP address");
        // Connect until a SYN goes unanswered: from then on the queue is full.
        let mut queued = Vec::new();
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => queued.push(stream),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            }
            assert!(queued.len() < 8, "the accept queue of {addr} never fills");
        }
        SilentTarget {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

/// One `[[route]]` table: a plain TCP route named `name` on port 0 to `target`, plus any
/// extra lines (per-route lifecycle keys).
pub fn plain_route(name: &str, target: SocketAddr, extra: &str) -> String {
    plain_route_to(name, &[target], extra)
}

/// [`plain_route`] with several targets, tried round-robin.
pub fn plain_route_to(name: &str, targets: &[SocketAddr], extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntargets = [{}]\n{extra}\n",
        targets.join(", ")
    )
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect to the proxy", TcpStream::connect(addr))
        .await
        .expect("connect to the proxy")
}

/// Reads until EOF and returns `(byte count, sha256)`, without holding it all.
pub async fn read_to_end_hashed(
    stream: &mut (impl AsyncReadExt + Unpin),
) -> std::io::Result<(usize, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0;
    loop {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buf[..read]);
        total += read;
    }
}

/// Writes `bytes` in chunks, then nothing else (the caller decides on FIN).
pub async fn write_chunked(
    stream: &mut (impl AsyncWriteExt + Unpin),
    bytes: &[u8],
) -> std::io::Result<()> {
    for chunk in bytes.chunks(256 * 1024) {
        stream.write_all(chunk).await?;
    }
    Ok(())
}

/// Sends `bytes` to an echo while reading the echo back (a stream each way at once),
/// checks what came back, and gives the stream back, open both ways.
pub async fn echo_stream(client: TcpStream, bytes: &[u8]) -> TcpStream {
    let (mut read, mut write) = client.into_split();
    let mut echoed = vec![0u8; bytes.len()];
    let (sent, got) = within("the stream echoed", async {
        tokio::join!(
            write_chunked(&mut write, bytes),
            read.read_exact(&mut echoed)
        )
    })
    .await;
    sent.expect("client streams");
    got.expect("client reads the echo");
    assert!(echoed == bytes, "the echo differs from what was sent");
    read.reunite(write).expect("the halves of one stream")
}

/// Connects to `addr` from the loopback address `source` (any port).
pub async fn try_connect_from(source: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let ip: std::net::IpAddr = source.parse().expect("a source address");
    let socket = tokio::net::TcpSocket::new_v4().expect("a client socket");
    socket
        .bind(SocketAddr::new(ip, 0))
        .expect("bind the client's source address");
    within("connect to the proxy", socket.connect(addr)).await
}

pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    try_connect_from(source, addr)
        .await
        .expect("connect to the proxy")
}

/// Connects from `source` and expects an RST at once: either on the first read, or
/// already as the connect's result when the proxy reset the connection before the connect
/// returned.
pub async fn expect_refused(source: &str, addr: SocketAddr) {
    match try_connect_from(source, addr).await {
        Ok(mut stream) => expect_reset(&mut stream).await,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a reset, got error {e}"),
    }
}

/// Asserts that `stream` was reset (ECONNRESET), not closed with a FIN.
pub async fn expect_reset(stream: &mut (impl AsyncReadExt + Unpin)) {
    let mut buf = [0u8; 1024];
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Err("EOF (FIN) instead of RST".to_owned()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("error {e} instead of RST")),
            }
        }
    })
    .await
    .expect("the reset arrives in time");
    if let Err(what) = outcome {
        panic!("expected a reset: got {what}");
    }
}

/// Sends `message` and checks that it comes back (through an [`echo`] backend).
pub async fn round_trip(client: &mut (impl AsyncRead + AsyncWrite + Unpin), message: &[u8]) {
    client.write_all(message).await.expect("client writes");
    let mut echoed = vec![0u8; message.len()];
    within("the echo comes back", client.read_exact(&mut echoed))
        .await
        .expect("client reads the echo");
    assert_eq!(echoed, message, "echoed bytes");
}

/// Reads `stream` to its end, bounded by [`WAIT`] (`what` names the wait), and asserts a
/// clean close (EOF, not RST) with no byte before it.
pub async fn expect_eof(stream: &mut (impl AsyncReadExt + Unpin), what: &str) {
    let mut rest = Vec::new();
    within(what, stream.read_to_end(&mut rest))
        .await
        .expect("a graceful close: EOF, not RST");
    assert!(
        rest.is_empty(),
        "{} unexpected bytes before EOF",
        rest.len()
    );
}

/// A backend script's first step: reads up to the client's FIN and checks that what came
/// before it was `request`.
pub async fn read_request(stream: &mut TcpStream, request: &[u8]) {
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .await
        .expect("backend reads up to the client's FIN");
    assert_eq!(received, request, "bytes before the client's FIN");
}

/// Asserts that `stream`, which already read its peer's FIN, is then reset. Reads return
/// EOF for good once a FIN arrived, so the RST shows as the socket's pending error
/// instead: EPIPE for a reset in CLOSE_WAIT, ECONNRESET otherwise.
pub async fn expect_reset_after_eof(stream: &TcpStream) {
    within("the reset arrives", stream.ready(Interest::ERROR))
        .await
        .expect("socket readiness");
    let error = stream
        .take_error()
        .expect("read SO_ERROR")
        .expect("a pending socket error");
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "expected a reset, got error {error}"
    );
}

/// Asserts that the proxy hangs up on `stream` without sending a byte: EOF or RST.
pub async fn expect_hangup(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    match within("the proxy hangs up", stream.read(&mut buf)).await {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(read) => panic!("expected a hang-up, got {read} bytes"),
        Err(e) => panic!("expected a hang-up, got error {e}"),
    }
}

/// The `index`th of the small messages a peer sends while a connection is half open.
pub fn tick(index: usize) -> [u8; 8] {
    let mut message = *b"tick0000";
    message[4..].copy_from_slice(format!("{:04}", index % 10_000).as_bytes());
    message
}

/// Sends `count` ticks, one every `every`, the first at once.
pub async fn send_ticks(stream: &mut (impl AsyncWriteExt + Unpin), count: usize, every: Duration) {
    let mut interval = tokio::time::interval(every);
    for index in 0..count {
        interval.tick().await;
        stream.write_all(&tick(index)).await.expect("send a tick");
    }
}

/// Reads the next tick and checks that it is the `index`th.
pub async fn read_tick(stream: &mut (impl AsyncReadExt + Unpin), index: usize) {
    let mut message = [0u8; 8];
    within("the next tick arrives", stream.read_exact(&mut message))
        .await
        .unwrap_or_else(|e| panic!("tick {index}: {e}"));
    assert_eq!(message, tick(index), "tick {index}");
}

/// Sets SO_LINGER 0 and drops the stream: the peer gets an RST.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER");
    drop(stream);
}

/// The number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// The first flight rustls sends to `server_name` (a DNS name, or an IP address, for
/// which a client sends no SNI).
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .expect("test server names are valid");
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut flight = Vec::new();
    while connection.wants_write() {
        connection
            .write_tls(&mut flight)
            .expect("writing to a Vec cannot fail");
    }
    flight
}
