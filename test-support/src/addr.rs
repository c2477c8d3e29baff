//! Loopback addresses for listeners a test starts later, and for targets that are not
//! there.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{SocketAddr, TcpListener};

/// Ports below the kernel's ephemeral range that [`free_port`] draws from.
const BELOW_EPHEMERAL: u16 = 8192;

/// A loopback port nobody listens on right now (bound, read, released), for a listener a
/// test starts after. It lies below the ephemeral range when the machine leaves room
/// there: a released ephemeral port can be taken as the source port of any connect()
/// before the test's listener binds it, and tests with thousands of connections in
/// flight (or in `TIME_WAIT`) did take one (`cannot listen on 127.0.0.1:32897: Address
/// already in use`, see docs/kernel-notes.md).
pub fn free_port() -> SocketAddr {
    let first_ephemeral = ephemeral_range_start();
    let low = first_ephemeral.saturating_sub(BELOW_EPHEMERAL).max(1024);
    if first_ephemeral > low {
        let random = RandomState::new();
        for attempt in 0..64u64 {
            let offset = random.hash_one(attempt) % u64::from(first_ephemeral - low);
            let port = low + u16::try_from(offset).expect("offset below a u16 span");
            if let Ok(addr) = TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.local_addr()) {
                return addr;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// The first port connect() may pick by itself (`net.ipv4.ip_local_port_range`); the
/// kernel's default when unreadable.
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_lies_below_the_ephemeral_range_and_can_be_bound() {
        let first_ephemeral = ephemeral_range_start();
        let addr = free_port();
        if first_ephemeral > 1024 {
            assert!(
                addr.port() < first_ephemeral,
                "{addr} is in the ephemeral range (from {first_ephemeral})"
            );
        }
        TcpListener::bind(addr).expect("the port is free to bind");
    }
}
