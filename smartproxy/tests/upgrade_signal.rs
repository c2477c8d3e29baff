//! SIGUSR2 upgrades the proxy as `smartproxy upgrade` does: the old process hands its
//! connection over and exits 0, and the successor serves it and answers on the control
//! socket, with the park delay the connection's traffic earned.

mod support;

use std::net::TcpStream;
use std::time::{Duration, Instant};

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

/// A connection that stopped parking between its heartbeats (its park delay doubled each
/// time they took it up soon after it parked: `smartproxy/src/park/mod.rs`) keeps its
/// delay in the successor. With `park_idle_after = "200ms"` and a heartbeat a second, the
/// delay goes 200 ms, 400 ms, 800 ms, 1.6 s; once it is longer than the heartbeats'
/// period the connection keeps its task. A successor that started it at 200 ms again would park it before each
/// of the next heartbeats.
#[test]
fn a_connection_that_stopped_parking_between_heartbeats_keeps_its_task_in_the_successor() {
    /// The heartbeats' period, and how long before each the test looks: a delay of 200
    /// ms and its sweep (every 100 ms) end well before the look, one of 1.6 s well after.
    const BEAT: Duration = Duration::from_millis(1000);
    const LOOK_BEFORE: Duration = Duration::from_millis(100);
    let parked = |proxy: &ProxyProcess| {
        let stats = proxy.stats();
        stats["connections"]["parked"]
            .as_u64()
            .unwrap_or_else(|| panic!("no connections.parked: {stats}"))
    };
    // Looks one `LOOK_BEFORE` ahead of a heartbeat, then makes it; returns what it saw.
    let beat = |proxy: &ProxyProcess, client: &mut TcpStream| {
        std::thread::sleep(BEAT - LOOK_BEFORE);
        let seen = parked(proxy);
        std::thread::sleep(LOOK_BEFORE);
        echo_once(client, b"beat");
        seen
    };
    let mut successors = Successors::new();
    let backend = echo_backend();
    let mut proxy = ProxyProcess::start_with(
        "beats",
        backend,
        "",
        &format!("{USERSPACE}\npark_idle_after = \"200ms\""),
    );
    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    echo_once(&mut client, b"open");
    let seen: Vec<u64> = (0..6).map(|_| beat(&proxy, &mut client)).collect();
    assert_eq!(
        (seen[0], seen[5]),
        (1, 0),
        "parked before the first heartbeat, not before the sixth: {seen:?}"
    );

    let successor = upgrade_by_signal(&mut proxy, &mut successors);
    echo_once(&mut client, b"after");
    for after in 0..2 {
        assert_eq!(
            beat(&proxy, &mut client),
            0,
            "heartbeat {after} after the upgrade found the connection parked\n{}",
            proxy.log()
        );
    }
    // Once the heartbeats stop it parks (each look runs `smartproxy stats`: not too often).
    let deadline = Instant::now() + WAIT;
    while parked(&proxy) != 1 {
        assert!(Instant::now() < deadline, "never parked in the successor");
        std::thread::sleep(LOOK_BEFORE);
    }
    echo_once(&mut client, b"last");
    drop(client);
    assert_eq!(
        successors.stop(successor, libc::SIGTERM),
        Some(0),
        "the successor stops cleanly"
    );
}
