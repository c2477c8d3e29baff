//! SIGUSR2 upgrades the proxy as `smartproxy upgrade` does: the old process hands its
//! connection over and exits 0, and the successor serves it and answers on the control
//! socket, with the park delay the connection's traffic earned, and arms for state events
//! the sockets it splices when its predecessor left them unarmed.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// A predecessor on `auto` arms sockets' sock_ops callbacks only when it splices them, so
/// a connection it hands over unspliced never armed itself. Its successor, configured
/// with `data_path = "ebpf"` (which alone would arm every socket at its handshake
/// instead), must arm the sockets it splices all the same: here the connection goes into
/// the kernel there, the client goes quiet for a second and then sends its FIN, which only
/// a state event reports while the backend keeps streaming; it has to reach the backend,
/// which then ends the connection. The count of `arms_at_splice=true` in the log pins
/// the successor's rule down; the FIN alone would also pass were the predecessor to arm
/// the sockets it hands over, which it does for a successor that does not arm, though
/// that cannot reach a connection still in a listener's backlog.
#[test]
fn a_successor_arms_what_it_splices_when_its_predecessor_armed_only_at_splice() {
    if !data_paths().contains(&"auto") {
        return;
    }
    let mut successors = Successors::new();
    let backend = streaming_backend();
    let mut proxy = ProxyProcess::start_with("stream", backend, "", "data_path = \"auto\"");
    if !proxy.log().contains("arms_at_splice=true") {
        eprintln!("SKIPPING this test: this kernel cannot arm sockets at splice time (6.12 on)");
        return;
    }
    let mut client = TcpStream::connect(proxy.listen).expect("connect through the proxy");
    echo_once(&mut client, b"hello");
    let config = std::fs::read_to_string(proxy.config_file()).expect("read the config");
    let config = config.replace("data_path = \"auto\"", "data_path = \"ebpf\"");
    std::fs::write(proxy.config_file(), config).expect("rewrite the config");

    let successor = upgrade_by_signal(&mut proxy, &mut successors);
    assert_eq!(
        proxy.log().matches("arms_at_splice=true").count(),
        2,
        "both processes arm at splice time:\n{}",
        proxy.log()
    );
    // Bytes both ways at once, well above `auto_splice_rate`, until the connection is in
    // the kernel; then the client's FIN.
    let mut writer = client.try_clone().expect("clone the client");
    let stop = Arc::new(AtomicBool::new(false));
    let uploading = Arc::clone(&stop);
    let upload = std::thread::spawn(move || {
        let chunk = vec![7u8; 64 << 10];
        while !uploading.load(Ordering::Relaxed) {
            writer.write_all(&chunk).expect("the client writes");
        }
        writer
    });
    let mut sink = vec![0u8; 1 << 20];
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    let deadline = Instant::now() + WAIT;
    let mut looked = Instant::now();
    loop {
        let read = client.read(&mut sink).expect("the backend streams");
        assert!(read > 0, "the backend streams until the client's FIN");
        if looked.elapsed() >= POLL {
            if proxy.stats()["ebpf"]["moves_to_kernel"].as_u64() > Some(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the successor never spliced the connection: {}",
                proxy.stats()
            );
            looked = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writer = upload.join().expect("the upload ends");
    // Long enough for the relay to have read the client's side empty and stopped
    // watching it, so that the FIN has no passed byte to ride on; the backend streams on.
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < quiet_until {
        let read = client.read(&mut sink).expect("the backend streams");
        assert!(read > 0, "the backend streams until the client's FIN");
    }
    writer.shutdown(Shutdown::Write).expect("the client's FIN");
    let deadline = Instant::now() + WAIT;
    loop {
        match client.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the backend still streams {WAIT:?} after the client's FIN: it never got it"
            ),
            Err(e) => panic!("reading after the client's FIN: {e}"),
        }
    }
    assert_eq!(
        successors.stop(successor, libc::SIGTERM),
        Some(0),
        "the successor stops cleanly"
    );
}

/// A backend that echoes the first five bytes of each connection, then streams to it
/// until it reads the client's EOF, and ends the connection then.
fn streaming_backend() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let addr = listener.local_addr().expect("the backend's address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut hello = [0u8; 5];
                if stream.read_exact(&mut hello).is_err() || stream.write_all(&hello).is_err() {
                    return;
                }
                let mut writer = stream.try_clone().expect("clone the backend stream");
                let done = Arc::new(AtomicBool::new(false));
                let streaming = Arc::clone(&done);
                let down = std::thread::spawn(move || {
                    let chunk = vec![9u8; 64 << 10];
                    while !streaming.load(Ordering::Relaxed) && writer.write_all(&chunk).is_ok() {}
                    let _ = writer.shutdown(Shutdown::Write);
                });
                let mut sink = vec![0u8; 1 << 20];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                done.store(true, Ordering::Relaxed);
                let _ = down.join();
            });
        }
    });
    addr
}
