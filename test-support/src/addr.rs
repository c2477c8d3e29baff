//! Loopback addresses for targets that are not there.

use std::net::{SocketAddr, TcpListener};

/// A loopback port nobody listens on right now (bound, read, released).
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// `count` distinct loopback addresses that refuse connections: ports bound together (so
/// that they differ), then released.
pub fn refused_addrs(count: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound address"))
        .collect()
}
