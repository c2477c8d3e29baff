//! `smartproxy run` under a service manager: with `NOTIFY_SOCKET` set (a path, or an
//! abstract name `@...`), it sends `READY=1` once its listener accepts connections, and
//! `STOPPING=1` when SIGTERM starts the shutdown.

use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

mod support;
use support::*;

/// The next datagram on `socket`, as text.
fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no sd_notify message within {WAIT:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Starts a proxy told to notify `notify_socket` (the `NOTIFY_SOCKET` value) and checks
/// the messages that `socket` receives.
fn notifies_ready_then_stopping(socket: &UnixDatagram, notify_socket: &str) {
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start_configured("notified", backend, "", USERSPACE, |command| {
        command.env("NOTIFY_SOCKET", notify_socket);
    });
    assert_eq!(next_message(socket), "READY=1");
    TcpStream::connect(proxy.listen).expect("the listener accepts once READY=1 is sent");

    proxy.signal(libc::SIGTERM);
    assert_eq!(next_message(socket), "STOPPING=1");
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}

#[test]
fn ready_and_stopping_on_a_path_socket() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    notifies_ready_then_stopping(&socket, path.to_str().expect("a UTF-8 path"));
}

#[test]
fn ready_and_stopping_on_an_abstract_socket() {
    let name = format!("smartproxy-test-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name");
    let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
    notifies_ready_then_stopping(&socket, &format!("@{name}"));
}

#[test]
fn no_notify_socket_no_message_and_still_ready() {
    // Without NOTIFY_SOCKET the proxy runs as usual (support::ProxyProcess waits for it).
    let backend = echo_backend();
    let mut proxy =
        ProxyProcess::start_configured("unnotified", backend, "", USERSPACE, |command| {
            command.env_remove("NOTIFY_SOCKET");
        });
    TcpStream::connect(proxy.listen).expect("the listener accepts");
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(WAIT).code(), Some(0));
}
