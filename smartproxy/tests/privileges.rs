//! `[proxy] user`: on each data path the proxy, started as root, runs as that user once
//! it is ready, with the expected capabilities in every thread (CAP_NET_ADMIN on the
//! ebpf and auto paths, none on userspace), still serves (new connections are spliced on
//! the ebpf path, and on auto at their first read, long after the drop), and its control
//! socket belongs to that user with mode 0600: the user can read stats, another user
//! cannot.
//!
//! The commands run as another user execute a copy of the binary in a directory of its
//! own that every user can traverse ([`Reachable`]): the build's binary may sit under a
//! 0700 directory (a checkout under /root), which that user cannot enter.
//! `a_binary_under_a_0700_directory_still_runs_as_another_user` proves the copy does it.
//!
//! Without `user`, started as the systemd unit starts it (a non-root user holding the
//! unit's ambient capabilities), the proxy ends with the same capabilities.
//!
//! Needs root: it creates the system users `smartproxy-test` and `smartproxy-other` if
//! they are missing, and skips loudly when not root.

mod support;

use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use smartproxy::privileges::{kept_capabilities, lookup, User};
use support::*;

const RUN_AS: &str = "smartproxy-test";
const OTHER: &str = "smartproxy-other";

fn ensure_user(name: &str) -> User {
    if let Ok(user) = lookup(name) {
        return user;
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .expect("run useradd");
    // Another test process may have created it at the same time.
    lookup(name).unwrap_or_else(|e| panic!("useradd {name} ({status}): {e}"))
}

/// A copy of a binary that any user can run: in a fresh 0755 directory under a temporary
/// directory whose every ancestor others may traverse.
struct Reachable {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Reachable {
    fn copy_of(binary: &Path) -> Reachable {
        let base = [std::env::temp_dir(), PathBuf::from("/tmp")]
            .into_iter()
            .find(|dir| traversable_by_others(dir))
            .expect("$TMPDIR or /tmp, with every ancestor traversable by other users");
        let dir = tempfile::tempdir_in(base).expect("a directory for the binary");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("open the binary's directory to all");
        let path = dir
            .path()
            .join(binary.file_name().expect("a binary file name"));
        // Written by a child process: a file this process wrote could still be open for
        // writing in a child another test forks at that moment, and running it would fail
        // with ETXTBSY ("Text file busy").
        let copied = Command::new("cp")
            .arg(binary)
            .arg(&path)
            .status()
            .expect("run cp");
        assert!(
            copied.success(),
            "cp {} {}: {copied}",
            binary.display(),
            path.display()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make the copy executable by all");
        Reachable { path, _dir: dir }
    }
}

/// Whether `dir` and each of its ancestors has the execute bit for others.
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|dir| {
        std::fs::metadata(dir).is_ok_and(|meta| meta.is_dir() && meta.mode() & 0o001 != 0)
    })
}

/// `smartproxy stats --json` against `proxy`, run as `user` from `binary`.
fn stats_as(user: &User, binary: &Reachable, proxy: &ProxyProcess) -> Output {
    Command::new(&binary.path)
        .args(["stats", "--json", "--control"])
        .arg(&proxy.control)
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .expect("run smartproxy stats")
}

/// Every thread's line `key` of `/proc/PID/task/*/status`.
fn thread_status(pid: libc::pid_t, key: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the proxy's threads")
        .filter_map(|entry| {
            let path = entry.ok()?.path().join("status");
            let status = std::fs::read_to_string(path).ok()?;
            status
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        })
        .collect()
}

#[test]
fn runs_as_the_configured_user_with_only_the_capabilities_it_needs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPING: dropping privileges needs root");
        return;
    }
    let user = ensure_user(RUN_AS);
    let other = ensure_user(OTHER);
    let binary = Reachable::copy_of(Path::new(env!("CARGO_BIN_EXE_smartproxy")));
    for data_path in data_paths() {
        eprintln!("--- data path: {data_path}");
        let backend = echo_backend();
        let proxy = ProxyProcess::start_with(
            "dropped",
            backend,
            "",
            &format!("{}\nuser = \"{RUN_AS}\"", data_path_lines(data_path)),
        );
        wait_until("the proxy drops its privileges", || {
            proxy.log().contains("privileges dropped")
        });
        let pid = proxy.pid();
        let uid = user.uid.to_string();
        let gid = user.gid.to_string();
        assert_eq!(
            proc_status(pid, "Uid")
                .split_whitespace()
                .collect::<Vec<_>>(),
            [uid.as_str(); 4],
            "real, effective, saved and fs uid"
        );
        assert_eq!(
            proc_status(pid, "Gid")
                .split_whitespace()
                .collect::<Vec<_>>(),
            [gid.as_str(); 4],
            "real, effective, saved and fs gid"
        );
        assert_eq!(proc_status(pid, "Groups"), "", "no supplementary groups");
        let expected = format!("{:016x}", kept_capabilities(splices(data_path)));
        for key in ["CapEff", "CapPrm"] {
            let sets = thread_status(pid, key);
            assert!(!sets.is_empty(), "the proxy has threads");
            assert!(
                sets.iter().all(|set| *set == expected),
                "{key} of every thread should be {expected}: {sets:?}"
            );
        }

        // The control socket: the running user's, 0600; its directory open to all, so
        // that only the socket's own mode keeps another user out.
        let dir = proxy
            .control
            .parent()
            .expect("the control socket's directory");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .expect("open the directory");
        let meta = std::fs::metadata(&proxy.control).expect("stat the control socket");
        assert_eq!(meta.uid(), user.uid, "owner of the control socket");
        assert_eq!(meta.mode() & 0o777, 0o600, "mode of the control socket");
        let own = stats_as(&user, &binary, &proxy);
        assert!(own.status.success(), "stats as {RUN_AS}: {own:?}");
        let denied = stats_as(&other, &binary, &proxy);
        assert!(!denied.status.success(), "stats as {OTHER} must fail");
        let message = String::from_utf8_lossy(&denied.stderr);
        assert!(
            message.contains("ermission denied"),
            "stats as {OTHER}: expected a permission error, got {message:?}"
        );

        // Still serving: a connection made after the drop.
        let mut client = TcpStream::connect(proxy.listen).expect("connect");
        echo_once(&mut client, b"after the drop");
        let stats = proxy.stats();
        assert_eq!(stats["connections"][booked_path(data_path)], 1, "{stats}");
        assert!(
            stats["process"]["open_fds"].as_u64() > Some(0),
            "the proxy still counts its descriptors as {RUN_AS}: {stats}"
        );
        if splices(data_path) {
            assert_eq!(stats["ebpf"]["sockhash_entries"], 2, "spliced: {stats}");
            assert_eq!(stats["ebpf"]["splice_failures"], 0, "{stats}");
        }
        echo_once(&mut client, b"and again");
    }
}

#[test]
fn a_binary_under_a_0700_directory_still_runs_as_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPING: running a command as another user needs root");
        return;
    }
    let other = ensure_user(OTHER);
    // What a checkout under /root looks like to another user.
    let private = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .expect("close the directory");
    let hidden = private.path().join("smartproxy");
    std::fs::copy(env!("CARGO_BIN_EXE_smartproxy"), &hidden).expect("copy the binary");
    let version_as_other = |binary: &Path| {
        Command::new(binary)
            .arg("--version")
            .uid(other.uid)
            .gid(other.gid)
            .output()
    };
    assert!(
        version_as_other(&hidden).is_err(),
        "{OTHER} must not reach {}: the test would prove nothing",
        hidden.display()
    );
    let reachable = Reachable::copy_of(&hidden);
    let output = version_as_other(&reachable.path).expect("run the reachable copy");
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("smartproxy "),
        "{output:?}"
    );
}

/// Without `user`, started as `dist/smartproxy.service` starts it: a non-root user with
/// ambient capabilities (`DynamicUser=yes`, `AmbientCapabilities=`), here set up by
/// util-linux `setpriv`. Once ready, every thread holds only the capabilities its data
/// path keeps, also as its ambient set (what an upgrade's successor needs: see
/// `smartproxy/src/privileges.rs`), and the proxy still serves (spliced on the ebpf path).
#[test]
fn without_user_the_unit_s_other_capabilities_go_after_setup() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPING: starting the proxy as another user needs root");
        return;
    }
    // The unit's capabilities (dist/smartproxy.service, AmbientCapabilities=).
    const UNIT_CAPS: &str = "+bpf,+perfmon,+net_admin,+net_bind_service";
    let user = ensure_user(RUN_AS);
    let binary = Reachable::copy_of(Path::new(env!("CARGO_BIN_EXE_smartproxy")));
    // systemd starts a service in a cgroup of its own; the proxy moves itself out of the
    // root cgroup only as root. Take this process (and so its children) out of it first.
    smartproxy::datapath::kernel::proxy_cgroup().expect("leave the root cgroup");
    for data_path in data_paths() {
        eprintln!("--- data path: {data_path}");
        let backend = echo_backend();
        let listen = free_port();
        // The user's own directory: config, control socket, log.
        let dir = tempfile::tempdir_in(binary._dir.path()).expect("a directory");
        std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
        let control = dir.path().join("control.sock");
        let config = dir.path().join("smartproxy.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\n{}\ncontrol_socket = {:?}\n\n\
                 [[route]]\nname = \"unit\"\nlisten = \"{listen}\"\ntargets = [\"{backend}\"]\n",
                data_path_lines(data_path),
                control.display().to_string()
            ),
        )
        .expect("write the config");
        let log = dir.path().join("proxy.log");
        let out = std::fs::File::create(&log).expect("create the log");
        let mut child = Command::new("setpriv")
            .args(["--reuid", RUN_AS, "--regid", RUN_AS, "--clear-groups"])
            .args(["--inh-caps", UNIT_CAPS, "--ambient-caps", UNIT_CAPS])
            .arg(&binary.path)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .spawn()
            .expect("run setpriv (util-linux)");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until("the proxy is ready", || {
            read_log().contains("smartproxy: ready") || matches!(child.try_wait(), Ok(Some(_)))
        });
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "the proxy exited:\n{}",
            read_log()
        );
        let pid = child.id() as libc::pid_t;
        assert!(
            read_log().contains("capabilities dropped"),
            "{}",
            read_log()
        );
        assert_eq!(
            proc_status(pid, "Uid").split_whitespace().next(),
            Some(user.uid.to_string().as_str()),
            "runs as {RUN_AS}, as a unit's User= or DynamicUser= would"
        );
        let expected = format!("{:016x}", kept_capabilities(splices(data_path)));
        for (key, want) in [
            ("CapEff", expected.as_str()),
            ("CapPrm", expected.as_str()),
            // Kept for an upgrade's successor: the unit's others are gone.
            ("CapAmb", expected.as_str()),
        ] {
            let sets = thread_status(pid, key);
            assert!(!sets.is_empty(), "the proxy has threads");
            assert!(
                sets.iter().all(|set| set == want),
                "{key} of every thread should be {want}: {sets:?}\n{}",
                read_log()
            );
        }

        let mut client = TcpStream::connect(listen).expect("connect");
        echo_once(&mut client, b"after the drop");
        let stats = Command::new("setpriv")
            .args(["--reuid", RUN_AS, "--regid", RUN_AS, "--clear-groups"])
            .arg(&binary.path)
            .args(["stats", "--json", "--control"])
            .arg(&control)
            .output()
            .expect("run smartproxy stats");
        assert!(stats.status.success(), "{stats:?}");
        let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("JSON");
        assert_eq!(stats["connections"][booked_path(data_path)], 1, "{stats}");
        if splices(data_path) {
            assert_eq!(stats["ebpf"]["sockhash_entries"], 2, "spliced: {stats}");
            assert_eq!(stats["ebpf"]["splice_failures"], 0, "{stats}");
        }
        echo_once(&mut client, b"and again");
        child.kill().expect("kill the proxy");
        child.wait().expect("reap the proxy");
    }
}
