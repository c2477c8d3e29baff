//! Running out of file descriptors (EMFILE): a `smartproxy run` child whose
//! RLIMIT_NOFILE is lowered (prlimit) gets more connections than it has descriptors for.
//! Its accept loop neither spins (its CPU time over a 3 s window stays under a bound) nor
//! dies, warns at most about once a second, does not hold the shortage against the
//! backend, and serves again once connections close.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// Sets the soft RLIMIT_NOFILE of process `pid`.
fn set_fd_limit(pid: libc::pid_t, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into `old`, a valid local.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit get");
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on our own child with a valid local limit.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit set");
}

const WARNING: &str = "accept failed; backing off";

#[test]
fn emfile_backs_off_without_spinning_and_recovers() {
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("fds", backend, "grace_period = \"1s\"");
    let pid = proxy.pid();
    // Room for a few proxied connections (two descriptors each), not for all.
    set_fd_limit(pid, fd_count(pid) as u64 + 6);

    let mut served = Vec::new();
    let mut stalled = Vec::new();
    const CONNECTS: u8 = 40;
    for index in 0..CONNECTS {
        let mut stream = TcpStream::connect(proxy.listen).expect("the kernel accepts");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("set a read timeout");
        let _ = stream.write_all(&[index]);
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(1) => served.push(stream),
            // Refused for want of a descriptor (reset or closed), or left in the backlog.
            _ => stalled.push(stream),
        }
    }
    assert!(!served.is_empty(), "some connections fit under the limit");
    assert!(!stalled.is_empty(), "the limit was reached");
    wait_until("the proxy hits EMFILE", || proxy.log().contains(WARNING));

    let warnings_before = proxy.log().matches(WARNING).count();
    let cpu_before = cpu_ticks(pid);
    let window = Duration::from_secs(3);
    std::thread::sleep(window);
    let cpu = cpu_ticks(pid) - cpu_before;
    let warnings = proxy.log().matches(WARNING).count() - warnings_before;
    // SAFETY: sysconf only reads a system constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        cpu < ticks_per_second / 2,
        "the accept loop spins: {cpu} ticks of CPU in {window:?}"
    );
    assert!(
        warnings <= window.as_secs() as usize + 1,
        "{warnings} warnings in {window:?}: more than one a second"
    );
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy died"
    );

    drop(stalled);
    drop(served);
    // Every connect reached the backlog, and the proxy takes each one in turn as
    // descriptors free up: only once it took the last are descriptors free for a new one
    // (no connection is active for a moment between two of them as well).
    wait_until("every connection taken and closed", || {
        let stats = proxy.stats();
        stats["connections"]["total"] == u64::from(CONNECTS) && stats["connections"]["active"] == 0
    });
    // A backend connect that failed for want of a descriptor is this host's shortage,
    // not the backend's: the backend stays up and serves the next connection.
    assert!(
        !proxy.log().contains("target down"),
        "EMFILE marked the backend down"
    );
    let mut fresh = TcpStream::connect(proxy.listen).expect("connect after recovery");
    echo_once(&mut fresh, b"served again");
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy still runs"
    );
}
