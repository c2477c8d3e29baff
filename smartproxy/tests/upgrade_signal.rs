//! SIGUSR2 upgrades the proxy as `smartproxy upgrade` does: the old process hands its
//! connection over and exits 0, and the successor serves it and answers on the control
//! socket.

mod support;

use std::net::TcpStream;

use support::*;

/// Sends SIGUSR2 and waits for the old process to exit 0; returns its successor's pid,
/// tracked by `successors`.
fn upgrade_by_signal(proxy: &mut ProxyProcess, successors: &mut Successors) -> libc::pid_t {
    proxy.signal(libc::SIGUSR2);
    let status = proxy.wait_exit(WAIT);
    assert!(
        status.success(),
        "the old process exits 0: {status}\n{}",
        proxy.log()
    );
    let successor = successor_pid(&proxy.log())
        .unwrap_or_else(|| panic!("no successor in the log:\n{}", proxy.log()));
    successors.track(successor);
    successor
}

#[test]
fn sigusr2_hands_every_connection_to_a_successor() {
    let mut successors = Successors::new();
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("echo", backend, "");
    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    echo_once(&mut client, b"before");

    let successor = upgrade_by_signal(&mut proxy, &mut successors);

    echo_once(&mut client, b"after");
    let stats = proxy.stats();
    assert_eq!(stats["connections"]["active"], 1, "{stats}");
    assert_eq!(stats["connections"]["total"], 1, "carried over: {stats}");
    drop(client);
    assert_eq!(
        successors.stop(successor, libc::SIGTERM),
        Some(0),
        "the successor stops cleanly"
    );
}

/// A listen address a reload added is handed over like those the proxy started with: the
/// successor accepts on it, and the connection made there before the upgrade keeps its
/// bytes.
#[test]
fn a_listen_address_a_reload_added_is_handed_over() {
    let mut successors = Successors::new();
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start("echo", backend, "");
    let added = free_port();
    let mut config = std::fs::read_to_string(proxy.config_file()).expect("read the config");
    config.push_str(&format!(
        "[[route]]\nname = \"added\"\nlisten = \"{added}\"\ntargets = [\"{backend}\"]\n"
    ));
    std::fs::write(proxy.config_file(), config).expect("rewrite the config");
    proxy.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + WAIT;
    while !proxy.log().contains("configuration reloaded (SIGHUP)") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload in the log:\n{}",
            proxy.log()
        );
        std::thread::sleep(POLL);
    }
    let mut client = TcpStream::connect(added).expect("connect to the added address");
    echo_once(&mut client, b"before");

    let successor = upgrade_by_signal(&mut proxy, &mut successors);

    echo_once(&mut client, b"after");
    let mut fresh = TcpStream::connect(added).expect("the successor accepts there");
    echo_once(&mut fresh, b"fresh");
    let stats = proxy.stats();
    assert_eq!(stats["connections"]["total"], 2, "{stats}");
    drop((client, fresh));
    assert_eq!(
        successors.stop(successor, libc::SIGTERM),
        Some(0),
        "the successor stops cleanly"
    );
}
