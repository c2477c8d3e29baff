//! The proxy killed with SIGKILL while spliced connections are open (ebpf data path):
//! nothing stays attached to its cgroup, and the next start serves normally.
//!
//! Each proxy runs in a cgroup this test makes for it alone (moved there before exec), so
//! that proxies of other tests running at the same time do not change the count of
//! programs attached to it.

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use support::*;

/// A cgroup v2 directory of its own, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new() -> Cgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mount = mountinfo
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split(' ').nth(4))
            .expect("a cgroup2 mount");
        let dir = Path::new(mount).join(format!("smartproxy-restart-test-{}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
        Cgroup(dir)
    }

    /// Programs attached to this cgroup as sock_ops (links included).
    fn sock_ops_programs(&self) -> u32 {
        const BPF_PROG_QUERY: libc::c_long = 16;
        const BPF_CGROUP_SOCK_OPS: u32 = 3;
        let dir = std::fs::File::open(&self.0).expect("open the cgroup");
        // union bpf_attr, query: target_fd, attach_type, query_flags, attach_flags,
        // prog_ids (u64), prog_cnt. With no prog_ids the kernel only writes the count.
        let mut attr = [0u32; 32];
        attr[0] = dir.as_raw_fd() as u32;
        attr[1] = BPF_CGROUP_SOCK_OPS;
        // SAFETY: bpf(2) reads and writes within `attr`, whose size is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
        attr[6]
    }

    /// A `configure` for [`ProxyProcess::start_configured`]: the child joins this cgroup
    /// before it execs.
    fn join(&self) -> impl FnOnce(&mut std::process::Command) {
        // Opened before the fork: between fork and exec only write(2) runs.
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.0.join("cgroup.procs"))
            .expect("open cgroup.procs");
        move |command| {
            // SAFETY: the hook calls write(2) alone, which is async-signal-safe, on a
            // descriptor the closure owns; "0" means the writing process.
            unsafe {
                command.pre_exec(move || {
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Fails while a process still runs in it; the test killed and reaped them all.
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

fn start(cgroup: &Cgroup, backend: std::net::SocketAddr) -> ProxyProcess {
    ProxyProcess::start_configured(
        "spliced",
        backend,
        "grace_period = \"1s\"",
        "data_path = \"ebpf\"",
        cgroup.join(),
    )
}

#[test]
fn sigkill_with_open_connections_leaves_nothing_attached_and_restart_serves() {
    if ebpf_or_skip("this test", smartproxy::datapath::probe_ebpf).is_none() {
        return;
    }
    let backend = echo_backend();
    let cgroup = Cgroup::new();
    assert_eq!(cgroup.sock_ops_programs(), 0, "a fresh cgroup");

    let mut proxy = start(&cgroup, backend);
    assert_eq!(
        cgroup.sock_ops_programs(),
        1,
        "the proxy's sock_ops program"
    );
    let mut open: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut stream = TcpStream::connect(proxy.listen).expect("connect");
            echo_once(&mut stream, format!("before {i}").as_bytes());
            stream
        })
        .collect();
    let stats = proxy.stats();
    assert_eq!(stats["connections"]["ebpf"], 20, "spliced: {stats}");
    proxy.signal(libc::SIGKILL);
    proxy.wait_exit(WAIT);

    // The kernel closed the killed proxy's sockets: each client sees EOF or RST.
    for stream in &mut open {
        let mut rest = Vec::new();
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        let _ = stream.read_to_end(&mut rest);
    }
    drop(open);
    assert_eq!(
        cgroup.sock_ops_programs(),
        0,
        "the killed proxy's program is detached"
    );

    let proxy = start(&cgroup, backend);
    assert_eq!(
        cgroup.sock_ops_programs(),
        1,
        "one program: the new proxy's"
    );
    let mut again: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut stream = TcpStream::connect(proxy.listen).expect("connect");
            echo_once(&mut stream, format!("after {i}").as_bytes());
            stream
        })
        .collect();
    let stats = proxy.stats();
    assert_eq!(stats["connections"]["ebpf"], 5, "spliced: {stats}");
    for map in ["sockets", "targets", "flows", "control"] {
        assert_eq!(
            stats["ebpf"]["map_entries"][map], 10,
            "{map}: two per connection, counted in the kernel: {stats}"
        );
    }
    for stream in &mut again {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("client FIN");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("the echo's FIN");
    }
    wait_until("every connection closed", || {
        proxy.stats()["connections"]["active"] == 0
    });
    // The kernel removes a closed socket from the sockhashes itself; FLOWS and CONTROL
    // entries only go when the proxy removes them.
    let stats = proxy.stats();
    for map in ["sockets", "targets", "flows", "control"] {
        assert_eq!(stats["ebpf"]["map_entries"][map], 0, "{map}: {stats}");
    }
    drop(proxy);
}
