//! Backend health, with real sockets:
//! - a blackholed target among three costs `fails` slow connects, then none for as long
//!   as its back-off lasts, and every client is served (on each data path, spliced);
//! - a refused target that comes back is used again once its back-off expires;
//! - active checks take a silent target down and bring it back with no client at all;
//! - when every target is down, a connection still tries one (the least recently
//!   failed), and a target that is back then serves it;
//! - a reload keeps the health of the targets it keeps (a down target stays down) and
//!   starts a new target up.
//!
//! Only the first runs on both data paths: the others are about the connect, which
//! happens before a connection's data path is chosen and is the same code for both.

use std::net::SocketAddr;

use smartproxy::config::DataPathMode;
use smartproxy::health::{FailureKind, TargetSnapshot};
use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The health of `target` in the proxy's stats.
fn target(proxy: &TestProxy, target: SocketAddr) -> TargetSnapshot {
    let name = target.to_string();
    proxy
        .stats()
        .targets
        .into_iter()
        .find(|t| t.target == name)
        .unwrap_or_else(|| panic!("no target {name} in the stats"))
}

/// A connection to an [`echo`] backend, through the proxy, there and back, then ended
/// cleanly.
async fn serve_one(proxy: &mut TestProxy, route: &str) {
    let mut client = connect(proxy.addr(route)).await;
    round_trip(&mut client, b"hello").await;
    close_normally(proxy, client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_target_costs_fails_slow_connects_then_none_during_its_back_off() {
    const FAILS: u64 = 2;
    const CONNECTIONS: usize = 12;
    for_each_data_path(|mode| async move {
        let silent = tokio::task::spawn_blocking(SilentTarget::bind)
            .await
            .expect("a silent target");
        let a = Backend::greeted(echo).await;
        let b = Backend::greeted(echo).await;
        // A back-off far longer than the test: once down, the silent target is never
        // tried again here.
        let route = plain_route_to(
            "three",
            &[a.addr, silent.addr, b.addr],
            &format!(
                "connect_timeout = \"200ms\"\nhealth = {{ fails = {FAILS}, backoff = \"1h\" }}"
            ),
        );
        let mut proxy = TestProxy::start(mode, &route).await;
        let front = Frontend::Plain(mode);
        // Round-robin starts each connection one target further: a third of them start at
        // the silent target, 4 of 12, more than FAILS.
        for i in 0..CONNECTIONS {
            let mut client = proxy.established(&front, "three").await;
            let spliced = proxy.kernel_bytes();
            round_trip(&mut client, format!("connection {i}").as_bytes()).await;
            proxy.assert_kernel_moved(spliced, Direction::BackendToClient);
            client.shutdown().await.expect("client FIN");
            let mut rest = Vec::new();
            within("the client reads to EOF", client.read_to_end(&mut rest))
                .await
                .expect("client reads");
            proxy.expect_closed(Reason::Normal).await;
        }
        let dead = target(&proxy, silent.addr);
        assert_eq!(
            dead.failures(FailureKind::Timeout),
            FAILS,
            "slow connects to the blackholed target"
        );
        assert!(!dead.up, "the blackholed target is down");
        assert_eq!(dead.connect_seconds.count, 0, "never connected");
        let (a, b) = (target(&proxy, a.addr), target(&proxy, b.addr));
        assert!(a.up && b.up, "the live targets stay up");
        assert_eq!(
            a.connect_seconds.count + b.connect_seconds.count,
            CONNECTIONS as u64,
            "every connection reached a live target"
        );
        assert_eq!(a.active + b.active, 0, "none left open");
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_comes_back_is_used_again_after_its_back_off() {
    init_tracing();
    let dead = refused_addrs(1)[0];
    let alive = Backend::spawn(echo).await;
    let route = plain_route_to(
        "back",
        &[dead, alive.addr],
        "health = { fails = 1, backoff = \"100ms\", backoff_max = \"100ms\" }",
    );
    let mut proxy = TestProxy::start(DataPathMode::Userspace, &route).await;
    // One of two connections starts at the dead target: refused once, it is down.
    for _ in 0..2 {
        serve_one(&mut proxy, "back").await;
    }
    let before = target(&proxy, dead);
    assert!(!before.up, "refused once with fails = 1: down");
    assert_eq!(before.failures(FailureKind::Refused), 1, "refused");
    let returned = Backend::spawn_at(dead, echo).await;
    within(
        "a connection tries the target again and finds it back",
        async {
            while !target(&proxy, dead).up {
                serve_one(&mut proxy, "back").await;
            }
        },
    )
    .await;
    let after = target(&proxy, dead);
    assert_eq!(after.failures(FailureKind::Refused), 1, "no failure since");
    assert!(after.connect_seconds.count >= 1, "connected again");
    returned.join().await;
    alive.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_dead_target_down_and_bring_it_back_without_clients() {
    init_tracing();
    let silent = tokio::task::spawn_blocking(SilentTarget::bind)
        .await
        .expect("a silent target");
    let addr = silent.addr;
    let alive = Backend::spawn(echo).await;
    let route = plain_route_to(
        "checked",
        &[addr, alive.addr],
        "health = { check_interval = \"50ms\", check_timeout = \"100ms\", rise = 2, fall = 2 }",
    );
    let proxy = TestProxy::start(DataPathMode::Userspace, &route).await;
    wait_for("the checks take the silent target down", || {
        !target(&proxy, addr).up
    })
    .await;
    assert!(target(&proxy, alive.addr).up, "the live target stays up");
    drop(silent);
    let returned = Backend::spawn_at(addr, echo).await;
    wait_for("the checks bring the target back", || {
        target(&proxy, addr).up
    })
    .await;
    assert_eq!(proxy.stats().connections.total, 0, "no client took part");
    let back = target(&proxy, addr);
    assert_eq!(
        FailureKind::ALL.map(|kind| back.failures(kind)),
        [0; 3],
        "checks are not counted as client connects"
    );
    returned.join().await;
    alive.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_target_down_a_connection_still_tries_one() {
    init_tracing();
    let dead = refused_addrs(2);
    let route = plain_route_to("down", &dead, "health = { fails = 1, backoff = \"1h\" }");
    let mut proxy = TestProxy::start(DataPathMode::Userspace, &route).await;
    let refused = |proxy: &TestProxy| -> u64 {
        dead.iter()
            .map(|addr| target(proxy, *addr).failures(FailureKind::Refused))
            .sum()
    };
    let mut first = connect(proxy.addr("down")).await;
    expect_hangup(&mut first).await;
    proxy.expect_closed(Reason::ConnectFailed).await;
    assert_eq!(refused(&proxy), 2, "both tried, both refused");
    assert!(
        dead.iter().all(|addr| !target(&proxy, *addr).up),
        "both down"
    );
    let mut second = connect(proxy.addr("down")).await;
    expect_hangup(&mut second).await;
    proxy.expect_closed(Reason::ConnectFailed).await;
    assert_eq!(refused(&proxy), 3, "all down: one of them tried, once");
    let returned = [
        Backend::spawn_at(dead[0], echo).await,
        Backend::spawn_at(dead[1], echo).await,
    ];
    serve_one(&mut proxy, "down").await;
    assert_eq!(refused(&proxy), 3, "the one tried is back");
    let up = dead.iter().filter(|addr| target(&proxy, **addr).up).count();
    assert_eq!(up, 1, "only the one tried is known to be back");
    for backend in returned {
        backend.join().await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_health_of_the_targets_it_keeps() {
    init_tracing();
    let dead = refused_addrs(1)[0];
    let alive = Backend::spawn(echo).await;
    let other = Backend::spawn(echo).await;
    let health = "health = { fails = 1, backoff = \"1h\" }";
    let mut proxy = TestProxy::start(
        DataPathMode::Userspace,
        &plain_route_to("kept", &[dead, alive.addr], health),
    )
    .await;
    for _ in 0..2 {
        serve_one(&mut proxy, "kept").await;
    }
    assert!(
        !target(&proxy, dead).up,
        "refused once with fails = 1: down"
    );
    // The route changes (a target added, a lifecycle key), its name and this target stay.
    proxy.rewrite_config(&plain_route_to(
        "kept",
        &[dead, alive.addr, other.addr],
        &format!("{health}\ninactivity_timeout = \"1h\""),
    ));
    proxy.proxy.reload().await.expect("the reload applies");
    let kept = target(&proxy, dead);
    assert!(!kept.up, "still down after the reload");
    assert_eq!(kept.failures(FailureKind::Refused), 1, "its counts kept");
    assert!(target(&proxy, other.addr).up, "a new target starts up");
    // Down, and with an hour of back-off: none of these tries it.
    for _ in 0..3 {
        serve_one(&mut proxy, "kept").await;
    }
    assert_eq!(target(&proxy, dead).failures(FailureKind::Refused), 1);
    alive.join().await;
    other.join().await;
    proxy.stop().await;
}
