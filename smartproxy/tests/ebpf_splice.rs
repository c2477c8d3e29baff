//! The kernel data path on real loopback sockets: `datapath::kernel::Kernel::splice` of the two
//! proxy-side sockets of a client <-> proxy <-> backend chain.
//!
//! Scenarios:
//! - `both_directions_at_once_arrive_intact`: 8 MiB each way at the same time, sha256
//!   compared, bytes the backend wrote before the splice are passed up to userspace and,
//!   forwarded there, arrive first (server-first), the verdict's counters match, and
//!   `delivered` becomes true. A read is worth trying while passed bytes wait, and not once
//!   every byte was redirected.
//! - `client_fin_is_reported_and_backend_to_client_keeps_flowing`: the client's FIN comes back
//!   as a `StateChange` of the client side, and makes a read worth trying with no byte
//!   passed; after `shutdown(SHUT_WR)` of the backend-side socket the backend sees EOF and
//!   its bytes still reach the client.
//! - `dropping_the_splice_removes_its_entries`: sockhash entries and events are accounted.
//! - `only_spliced_sockets_run_the_sock_ops_program`: where the kernel lets a splice arm
//!   its sockets' callbacks (6.12 on), sockets that are not spliced run no sock_ops program
//!   per ACK, and spliced ones do; the FIN test runs again with every socket armed at its
//!   handshake (`LoadOptions::arm_at_splice` off, as on older kernels), and
//!   `where_every_socket_arms_at_its_handshake_each_runs_the_sock_ops_program` counts that.
//!
//! One test at a time ([`ONE_AT_A_TIME`]): every armed socket runs each sock_ops program
//! loaded on the cgroup, the other tests' programs too, and two tests count runs.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON). Without it each test prints
//! `SKIPPING this test: ...` and passes, unless `SMARTPROXY_REQUIRE_EBPF=1`.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsFd,
    thread,
    time::Duration,
};

use smartproxy::{
    config::LoadOptions,
    datapath::kernel::{Kernel, MapEntries, Splice, SpliceEvent, StateChange, TcpState, Wait},
    vocab::Side,
};
use smartproxy_test_support::{ebpf_or_skip, pattern, sha256};
use tokio::time::timeout;

/// Bounds a failing wait; never the wait itself.
const GENEROUS: Duration = Duration::from_secs(30);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Loads the eBPF data path, or skips (see [`ebpf_or_skip`]). Without a relay nobody
/// forwards the bytes the verdict passes up at the backpressure cap, so these raw splices
/// get a cap they never reach.
fn kernel_or_skip() -> Option<Kernel> {
    kernel_arming_or_skip(true)
}

/// [`kernel_or_skip`] with `LoadOptions::arm_at_splice` as given.
fn kernel_arming_or_skip(arm_at_splice: bool) -> Option<Kernel> {
    let options = LoadOptions {
        max_queued_bytes: 64 << 20,
        arm_at_splice,
        ..LoadOptions::default()
    };
    ebpf_or_skip("this test", || {
        let kernel = Kernel::load(options).map_err(|e| smartproxy::error_chain(&e))?;
        kernel
            .start_events()
            .map_err(|e| smartproxy::error_chain(&e))?;
        Ok(kernel)
    })
}

/// client <-> (proxy_client | proxy_backend) <-> backend, all blocking std sockets.
struct Chain {
    client: TcpStream,
    proxy_client: TcpStream,
    proxy_backend: TcpStream,
    backend: TcpStream,
}

impl Chain {
    /// Must run after `Kernel::load`: sockets created before it may sit in a cgroup the
    /// sock_ops program does not see.
    fn connect() -> Chain {
        let proxy_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(proxy_listener.local_addr().unwrap()).unwrap();
        let (proxy_client, _) = proxy_listener.accept().unwrap();
        let proxy_backend = TcpStream::connect(backend_listener.local_addr().unwrap()).unwrap();
        let (backend, _) = backend_listener.accept().unwrap();
        Chain {
            client,
            proxy_client,
            proxy_backend,
            backend,
        }
    }

    fn splice(&self, kernel: &Kernel) -> Splice {
        kernel
            .splice(self.proxy_client.as_fd(), self.proxy_backend.as_fd())
            .expect("splice of two established loopback sockets")
    }
}

/// Writes `data` then reads exactly `expect_len` bytes, concurrently; returns what was read.
fn exchange(mut sock: TcpStream, data: Vec<u8>, expect_len: usize) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut writer = sock.try_clone().unwrap();
        let w = thread::spawn(move || writer.write_all(&data).unwrap());
        let mut got = vec![0; expect_len];
        sock.read_exact(&mut got).unwrap();
        w.join().unwrap();
        got
    })
}

async fn wait_delivered(splice: &Splice, source: Side) {
    timeout(GENEROUS, async {
        while !splice.may_write(source, 0, Wait::Delivered).unwrap() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{source} bytes not delivered: {:?}", splice.flow(source)));
}

/// The first state change of `side`'s socket; earlier ones of the other side, and other
/// events, are skipped.
async fn next_change(splice: &mut Splice, side: Side) -> StateChange {
    timeout(GENEROUS, async {
        loop {
            let event = splice
                .next_event()
                .await
                .expect("the event reader is running");
            if let SpliceEvent::State(change) = event {
                if change.side == side {
                    return change;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no state change of the {side} socket"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_at_once_arrive_intact() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let mut chain = Chain::connect();
    const SIZE: usize = 8 << 20;
    let server_first = b"220 backend speaks first\r\n";
    chain.backend.write_all(server_first).unwrap();
    // Let the greeting land in proxy_backend's receive queue before the splice.
    thread::sleep(Duration::from_millis(50));

    let mut splice = chain.splice(&kernel);
    // Bytes queued before the splice are passed up (`Flow::pass_first`): forward them as
    // the relay does, and report them, after which the verdict redirects.
    assert!(
        splice.may_have_bytes_to_read(Side::Backend),
        "the passed greeting waits: {:?}",
        splice.flow(Side::Backend)
    );
    let mut greeting = vec![0; server_first.len()];
    chain.proxy_backend.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, server_first, "passed up whole and in order");
    chain.proxy_client.write_all(&greeting).unwrap();
    splice
        .flushed(Side::Backend, greeting.len() as u64)
        .unwrap();
    let up = pattern(SIZE, 1);
    let down = pattern(SIZE, 2);
    let (up_sha, down_sha) = (sha256(&up), sha256(&down));
    let client = exchange(
        chain.client.try_clone().unwrap(),
        up,
        server_first.len() + SIZE,
    );
    let backend = exchange(chain.backend.try_clone().unwrap(), down, SIZE);
    let (got_down, got_up) =
        tokio::task::spawn_blocking(move || (client.join().unwrap(), backend.join().unwrap()))
            .await
            .unwrap();

    assert_eq!(
        &got_down[..server_first.len()],
        server_first,
        "server-first bytes come first"
    );
    assert_eq!(
        sha256(&got_down[server_first.len()..]),
        down_sha,
        "backend->client intact"
    );
    assert_eq!(sha256(&got_up), up_sha, "client->backend intact");

    let up_flow = splice.flow(Side::Client).unwrap();
    let down_flow = splice.flow(Side::Backend).unwrap();
    assert_eq!(up_flow.redirected, SIZE as u64);
    assert_eq!(down_flow.passed, server_first.len() as u64);
    assert_eq!(down_flow.redirected, SIZE as u64);
    assert!(up_flow.last_activity_ns > 0 && down_flow.last_activity_ns > 0);
    // Both sockets were readable all along (the verdict wakes readers after every skb),
    // but nothing waits in them: a read would only hold them.
    assert!(!splice.may_have_bytes_to_read(Side::Client));
    assert!(!splice.may_have_bytes_to_read(Side::Backend));
    wait_delivered(&splice, Side::Client).await;
    wait_delivered(&splice, Side::Backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_is_reported_and_backend_to_client_keeps_flowing() {
    let _one = ONE_AT_A_TIME.lock().await;
    if let Some(kernel) = kernel_or_skip() {
        fin_is_reported_and_the_other_way_keeps_flowing(kernel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_is_reported_where_every_socket_arms_at_its_handshake() {
    let _one = ONE_AT_A_TIME.lock().await;
    if let Some(kernel) = kernel_arming_or_skip(false) {
        assert!(!kernel.arms_at_splice());
        fin_is_reported_and_the_other_way_keeps_flowing(kernel).await;
    }
}

async fn fin_is_reported_and_the_other_way_keeps_flowing(kernel: Kernel) {
    let mut chain = Chain::connect();
    let mut splice = chain.splice(&kernel);

    let request = pattern(256 << 10, 3);
    chain.client.write_all(&request).unwrap();
    chain.client.shutdown(Shutdown::Write).unwrap();

    let change = next_change(&mut splice, Side::Client).await;
    assert_eq!(
        (change.old, change.new),
        (TcpState::Established, TcpState::CloseWait),
        "the client's FIN"
    );
    assert!(
        splice.may_have_bytes_to_read(Side::Client),
        "no byte was passed up, but the FIN (EOF) waits to be read"
    );
    // Propagate the FIN only once every redirected byte has reached the backend socket.
    wait_delivered(&splice, Side::Client).await;
    chain.proxy_backend.shutdown(Shutdown::Write).unwrap();

    let mut backend = chain.backend.try_clone().unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        backend.read_to_end(&mut got).unwrap();
        got
    })
    .await
    .unwrap();
    assert_eq!(
        sha256(&got),
        sha256(&request),
        "the backend gets every byte, then EOF"
    );

    // Backend -> client still moves in the kernel after both half-closes above.
    let response = pattern(4 << 20, 4);
    let response_sha = sha256(&response);
    let backend = exchange(chain.backend.try_clone().unwrap(), response, 0);
    let mut client = chain.client.try_clone().unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut got = vec![0; 4 << 20];
        client.read_exact(&mut got).unwrap();
        got
    })
    .await
    .unwrap();
    backend.join().unwrap();
    assert_eq!(
        sha256(&got),
        response_sha,
        "backend->client intact after the client's FIN"
    );
    assert_eq!(splice.flow(Side::Backend).unwrap().redirected, 4 << 20);

    // The backend-side socket half-closed above (FIN_WAIT1, FIN_WAIT2); the backend's FIN
    // now ends it.
    chain.backend.shutdown(Shutdown::Write).unwrap();
    loop {
        let change = next_change(&mut splice, Side::Backend).await;
        if change.old == TcpState::FinWait2 {
            assert!(
                matches!(change.new, TcpState::TimeWait | TcpState::Close),
                "the backend's FIN: {change:?}"
            );
            break;
        }
    }
    let stats = kernel.stats();
    assert!(stats.events >= 2, "both FINs were counted: {stats:?}");
    assert_eq!(stats.events_lost, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_splice_removes_its_entries() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    let chain = Chain::connect();
    let before = kernel.stats();
    let splice = chain.splice(&kernel);
    assert_eq!(kernel.stats().sockhash_entries, before.sockhash_entries + 2);
    let two = MapEntries {
        sockets: 2,
        targets: 2,
        flows: 2,
        control: 2,
    };
    assert_eq!(kernel.map_entries().unwrap(), two, "counted in the kernel");
    let again = kernel.splice(chain.proxy_client.as_fd(), chain.proxy_backend.as_fd());
    again.expect_err("a socket cannot be spliced twice");
    assert_eq!(
        kernel.stats().sockhash_entries,
        before.sockhash_entries + 2,
        "a refused splice leaves the first one alone"
    );
    assert_eq!(
        kernel.map_entries().unwrap(),
        two,
        "the refused splice added none"
    );
    drop(splice);
    assert_eq!(kernel.stats().sockhash_entries, before.sockhash_entries);
    // The sockets are still open: the splice removed every entry itself.
    assert_eq!(kernel.map_entries().unwrap(), MapEntries::default());

    // Unspliced, bytes stay in the proxy-side socket for userspace to read.
    let (mut client, mut proxy_client) = (chain.client, chain.proxy_client);
    client.write_all(b"ping").unwrap();
    let mut got = [0; 4];
    proxy_client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

/// Round trips of 64 bytes, `requester` writing and `responder` echoing: on an unspliced
/// pair the two ends of one connection, on a splice the client and the backend.
fn round_trips(requester: &mut TcpStream, responder: &mut TcpStream, count: usize) {
    let mut buf = [0u8; 64];
    for i in 0..count {
        let message = [i as u8; 64];
        requester.write_all(&message).unwrap();
        responder.read_exact(&mut buf).unwrap();
        responder.write_all(&buf).unwrap();
        requester.read_exact(&mut buf).unwrap();
        assert_eq!(buf, message);
    }
}

const ROUND_TRIPS: usize = 200;

/// How often `kernel`'s sock_ops program ran while `exchange` did.
fn runs_during(kernel: &Kernel, exchange: impl FnOnce()) -> u64 {
    let before = kernel.sock_ops_runs().unwrap();
    exchange();
    kernel.sock_ops_runs().unwrap() - before
}

/// Turns on the kernel's BPF run statistics while the returned descriptor is open, or
/// skips with a line saying why: `BPF_ENABLE_STATS` needs CAP_SYS_ADMIN, which the
/// kernel path itself does not (so `SMARTPROXY_REQUIRE_EBPF` does not make it fail).
fn run_statistics_or_skip() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .inspect_err(|e| eprintln!("SKIPPING this test: BPF run statistics: {e}"))
        .ok()
}

/// Whether this kernel is one that lets a cgroup setsockopt program set sock_ops callback
/// flags (`TCP_BPF_SOCK_OPS_CB_FLAGS` in `bpf_setsockopt`, Linux 6.12; an older one may
/// have it backported).
fn kernel_can_arm_at_splice() -> bool {
    let current = aya::util::KernelVersion::current().expect("the running kernel's version");
    current >= aya::util::KernelVersion::new(6, 12, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_spliced_sockets_run_the_sock_ops_program() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    assert!(
        kernel.arms_at_splice() || !kernel_can_arm_at_splice(),
        "splices arm their sockets where the kernel allows it"
    );
    if !kernel.arms_at_splice() {
        return;
    }
    let Some(_stats) = run_statistics_or_skip() else {
        return;
    };
    let mut chain = Chain::connect();
    let unspliced = runs_during(&kernel, || {
        round_trips(&mut chain.client, &mut chain.proxy_client, ROUND_TRIPS);
        round_trips(&mut chain.proxy_backend, &mut chain.backend, ROUND_TRIPS);
    });
    // 0 here; other processes' connections in the same cgroup may add their handshakes.
    assert!(
        unspliced < ROUND_TRIPS as u64 / 4,
        "{ROUND_TRIPS} round trips on each unspliced pair ran the program {unspliced} times"
    );

    let _splice = chain.splice(&kernel);
    let (mut client, mut backend) = (chain.client, chain.backend);
    let spliced = runs_during(&kernel, || {
        round_trips(&mut client, &mut backend, ROUND_TRIPS)
    });
    assert!(
        spliced >= ROUND_TRIPS as u64,
        "{ROUND_TRIPS} round trips through the splice ran the program {spliced} times: an RTT \
         sample per acknowledged message on each spliced socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_every_socket_arms_at_its_handshake_each_runs_the_sock_ops_program() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(kernel) = kernel_arming_or_skip(false) else {
        return;
    };
    let Some(_stats) = run_statistics_or_skip() else {
        return;
    };
    let mut chain = Chain::connect();
    let unspliced = runs_during(&kernel, || {
        round_trips(&mut chain.client, &mut chain.proxy_client, ROUND_TRIPS)
    });
    assert!(
        unspliced >= ROUND_TRIPS as u64,
        "{ROUND_TRIPS} round trips on an unspliced pair ran the program {unspliced} times"
    );
}
