//! A backend that accepts and never reads, on each data path: the client's writes block
//! (the bytes it got rid of stay under a ceiling set by socket buffers and
//! `max_queued_bytes`), and the proxy's resident memory stays under a fixed ceiling
//! while the client tries to send far more.

mod support;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use support::*;

/// What the client tries to send: far more than any buffer on the way.
const ATTEMPT: usize = 1024 * 1024 * 1024;
/// What may be buffered between the client and the silent backend: four socket buffers
/// on loopback (a few MiB each at most) and the 1 MiB `max_queued_bytes`.
const BUFFERED_CEILING: usize = 48 * 1024 * 1024;
/// Growth of the proxy's resident memory allowed while the client is blocked.
const RSS_CEILING_KIB: u64 = 16 * 1024;

fn rss_kib(pid: libc::pid_t) -> u64 {
    let rss = proc_status(pid, "VmRSS");
    rss.trim_end_matches(" kB")
        .trim()
        .parse()
        .expect("VmRSS in kB")
}

#[test]
fn backend_that_never_reads_blocks_the_client_and_bounds_memory() {
    for data_path in data_paths() {
        eprintln!("--- data path: {data_path}");
        let silent = TcpListener::bind("127.0.0.1:0").expect("bind the silent backend");
        let backend = silent.local_addr().expect("backend address");
        let proxy = ProxyProcess::start_with(
            "silent",
            backend,
            "",
            &format!("{}\nmax_queued_bytes = 1048576", data_path_lines(data_path)),
        );
        let rss_before = rss_kib(proxy.pid());
        let mut client = TcpStream::connect(proxy.listen).expect("connect");
        let (_held, _) = silent.accept().expect("the proxy connects the backend");
        client
            .set_write_timeout(Some(Duration::from_secs(2)))
            .expect("write timeout");
        let chunk = vec![0x5a; 64 * 1024];
        let mut written = 0;
        let blocked = loop {
            match client.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break true,
                Err(e) => panic!("client write failed after {written} bytes: {e}"),
            }
            if written >= ATTEMPT {
                break false;
            }
        };
        let rss_after = rss_kib(proxy.pid());
        eprintln!("written {written} bytes; proxy RSS {rss_before} kB -> {rss_after} kB");
        assert!(blocked, "the client wrote {ATTEMPT} bytes without blocking");
        assert!(
            written < BUFFERED_CEILING,
            "{written} bytes left the client before it blocked"
        );
        assert!(
            rss_after.saturating_sub(rss_before) < RSS_CEILING_KIB,
            "the proxy grew from {rss_before} kB to {rss_after} kB"
        );
        let stats = proxy.stats();
        assert_eq!(stats["connections"]["active"], 1, "{stats}");
        // On auto the splice waits for a moment when the relay found both sockets empty,
        // which a client writing as fast as it can toward a backend that reads nothing
        // may never give (seen: it stayed on the relay); the bounds above hold either way.
        if data_path != "auto" {
            assert_eq!(stats["connections"][data_path], 1, "{stats}");
        }
    }
}
