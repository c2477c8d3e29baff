//! The options of the proxy's own sockets, read back from them with getsockopt: both
//! sides of a connection have `TCP_NODELAY` (the client's socket inherits it from its
//! listener, the backend's gets it after the connect) and the route's `tcp_keepalive`
//! (idle, interval = idle / 4 + 1 s, 4 probes); `tcp_keepalive = "0s"` leaves keepalive
//! off. The client's socket inherits keepalive from its listener too, which is bound
//! with the route's: after a reload changes it (the listener keeps what it was bound
//! with), a new connection still gets the new value, and "0s" turns it off. The proxy
//! runs in this process, so its descriptors are found in /proc/self/fd by their
//! addresses.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use smartproxy_tests::*;
use socket2::SockRef;

/// What a socket says of the options under test.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    nodelay: bool,
    /// (idle, interval, probes) when keepalive is on.
    keepalive: Option<(Duration, Duration, u32)>,
}

/// The options of this process's socket whose (local, peer) addresses pass `which`.
fn options_of(what: &str, which: impl Fn(SocketAddr, SocketAddr) -> bool) -> Options {
    let entries = std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd");
    for entry in entries.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is open (it was listed), and the proxy, which owns it,
        // keeps the connection open while the test looks (the client has not closed).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let addresses = (socket.local_addr(), socket.peer_addr());
        let (Ok(local), Ok(peer)) = addresses else {
            continue;
        };
        let (Some(local), Some(peer)) = (local.as_socket(), peer.as_socket()) else {
            continue;
        };
        if !which(local, peer) {
            continue;
        }
        let on = socket.keepalive().expect("SO_KEEPALIVE");
        return Options {
            nodelay: socket.nodelay().expect("TCP_NODELAY"),
            keepalive: on.then(|| {
                (
                    socket.keepalive_time().expect("TCP_KEEPIDLE"),
                    socket.keepalive_interval().expect("TCP_KEEPINTVL"),
                    socket.keepalive_retries().expect("TCP_KEEPCNT"),
                )
            }),
        };
    }
    panic!("no socket of this process is {what}");
}

/// `tcp_keepalive` as the proxy's sockets report it: (idle, interval, probes), or off.
fn keepalive_of(setting: &str) -> Option<(Duration, Duration, u32)> {
    match setting {
        "0s" => None,
        "40s" => Some((Duration::from_secs(40), Duration::from_secs(11), 4)),
        "20s" => Some((Duration::from_secs(20), Duration::from_secs(6), 4)),
        other => panic!("no expectation for tcp_keepalive = {other:?}"),
    }
}

/// A route `r` to `backend` with `tcp_keepalive`.
fn route_with_keepalive(backend: SocketAddr, tcp_keepalive: &str) -> String {
    plain_route(
        "r",
        backend,
        &format!("tcp_keepalive = \"{tcp_keepalive}\""),
    )
}

/// Opens a connection through `proxy`'s route `r` and checks both of the proxy's
/// sockets for it against `tcp_keepalive`; closes it.
async fn check_connection(proxy: &mut TestProxy, backend: SocketAddr, tcp_keepalive: &str) {
    let listen = proxy.addr("r");
    let mut client = connect(listen).await;
    round_trip(&mut client, b"options").await;
    let client_addr = client.local_addr().expect("client address");
    let expected = Options {
        nodelay: true,
        keepalive: keepalive_of(tcp_keepalive),
    };
    assert_eq!(
        options_of(
            "the proxy's side of the client connection",
            |local, peer| { local == listen && peer == client_addr }
        ),
        expected,
        "the proxy's socket toward the client"
    );
    // The backend's own socket has the backend's address as its local one; the proxy's
    // socket toward it has it as its peer, and this is the only connection open.
    assert_eq!(
        options_of("the proxy's socket toward the backend", |_, peer| {
            peer == backend
        }),
        expected,
        "the proxy's socket toward the backend"
    );
    close_normally(proxy, client).await;
}

#[tokio::test]
async fn both_sides_have_nodelay_and_the_routes_keepalive_or_none() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        // Each start binds the listener with its route's keepalive; each reload keeps
        // that listener, so its connections must be set apart from what they inherit.
        for (start, reloads) in [("40s", &["20s", "0s"][..]), ("0s", &["40s"][..])] {
            eprintln!("--- tcp_keepalive = {start:?}");
            let mut proxy =
                TestProxy::start(mode, &route_with_keepalive(backend.addr, start)).await;
            check_connection(&mut proxy, backend.addr, start).await;
            for reloaded in reloads {
                eprintln!("--- reloaded: tcp_keepalive = {reloaded:?}");
                proxy.rewrite_config(&route_with_keepalive(backend.addr, reloaded));
                proxy.proxy.reload().await.expect("the reload applies");
                check_connection(&mut proxy, backend.addr, reloaded).await;
            }
            proxy.stop().await;
        }
        backend.join().await;
    })
    .await;
}
