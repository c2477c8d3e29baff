//! Admission limits, on each data path: for every limit the connection past it is reset
//! at once and counted (its closure reason, and `smartproxy_connections_refused_total`
//! for that limit alone, scraped from the metrics endpoint), the connections already
//! open keep working, and (for the caps) closing one lets a new one in.
//! - `[proxy] max_connections`, route `max_connections`;
//! - `max_connections_per_ip`, in `[proxy]` and on a route (several loopback sources);
//! - `connection_rate_per_ip`;
//! - route `allow` / `deny` lists (reason `denied`).
//!
//! On userspace the admitted connections are parked (`park_idle_after = "200ms"`) before
//! the next one comes: a parked connection keeps its slots.

use smartproxy::config::DataPathMode;
use smartproxy::limits::Refusal;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a message through the echo backend and reads it back.
async fn round_trip(stream: &mut TcpStream, index: usize) {
    stream.write_all(&tick(index)).await.expect("client writes");
    read_tick(stream, index).await;
}

/// Closes `stream` cleanly: FIN, then the echo backend's FIN.
async fn hang_up(mut stream: TcpStream) {
    stream.shutdown().await.expect("client FIN");
    let mut rest = Vec::new();
    within("the backend's FIN", stream.read_to_end(&mut rest))
        .await
        .expect("read to EOF");
}

struct Case<'a> {
    /// Lines for `[proxy]`.
    proxy: &'a str,
    /// Lines for the route.
    route: &'a str,
    /// One admitted connection per entry, from that source.
    admitted: &'a [&'a str],
    /// The source of the connection that is refused.
    refused: &'a str,
    reason: Reason,
    /// The limit that refuses it.
    limit: Refusal,
    /// Whether closing the first admitted connection makes room for `refused`.
    frees_a_slot: bool,
}

async fn refuses_the_next(mode: DataPathMode, case: Case<'_>) {
    let backend = Backend::spawn(echo).await;
    let config = format!(
        "metrics = \"127.0.0.1:0\"\n{PARK_SOON}{}\n{}",
        case.proxy,
        plain_route("limited", backend.addr, case.route)
    );
    let mut proxy = TestProxy::start(mode, &config).await;
    let addr = proxy.addr("limited");
    let mut open = Vec::new();
    for (index, source) in case.admitted.iter().enumerate() {
        let mut client = connect_from(source, addr).await;
        round_trip(&mut client, index).await;
        open.push(client);
    }
    if mode == DataPathMode::Userspace {
        proxy.wait_parked(case.admitted.len() as u64).await;
    }

    expect_refused(case.refused, addr).await;
    proxy.expect_closed(case.reason).await;
    assert_eq!(proxy.stats().closed(case.reason), 1, "counted");
    let metrics = scrape(proxy.proxy.metrics_addr().expect("a metrics address")).await;
    for limit in Refusal::ALL {
        assert_eq!(
            counter(
                &metrics,
                "smartproxy_connections_refused_total",
                &[("limit", limit.as_str())]
            ),
            f64::from(u8::from(limit == case.limit)),
            "refusals by {limit}"
        );
    }
    for (index, client) in open.iter_mut().enumerate() {
        round_trip(client, 100 + index).await;
    }
    proxy.assert_nothing_closed();

    if case.frees_a_slot {
        hang_up(open.remove(0)).await;
        proxy.expect_closed(Reason::Normal).await;
        let mut again = connect_from(case.refused, addr).await;
        round_trip(&mut again, 200).await;
        open.push(again);
    }
    for client in open {
        hang_up(client).await;
    }
    proxy.wait_idle().await;
    assert_eq!(proxy.stats().closed(case.reason), 1, "refused once only");
    proxy.stop().await;
    backend.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_max_connections() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "max_connections = 2",
                route: "",
                admitted: &["127.0.0.2", "127.0.0.3"],
                refused: "127.0.0.4",
                reason: Reason::MaxConnections,
                limit: Refusal::MaxConnections,
                frees_a_slot: true,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_max_connections() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "",
                route: "max_connections = 2",
                admitted: &["127.0.0.2", "127.0.0.3"],
                refused: "127.0.0.4",
                reason: Reason::MaxConnections,
                limit: Refusal::RouteMaxConnections,
                frees_a_slot: true,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_max_connections_per_ip() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "max_connections_per_ip = 2",
                route: "",
                admitted: &["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"],
                refused: "127.0.0.2",
                reason: Reason::MaxConnections,
                limit: Refusal::MaxConnectionsPerIp,
                frees_a_slot: true,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_max_connections_per_ip() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "",
                route: "max_connections_per_ip = 1",
                admitted: &["127.0.0.2", "127.0.0.3"],
                refused: "127.0.0.2",
                reason: Reason::MaxConnections,
                limit: Refusal::RouteMaxConnectionsPerIp,
                frees_a_slot: true,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_per_ip() {
    // A burst of 3 a minute: the 4th from the same address is refused even after the
    // others closed (the bucket refills one per 20 s); another address is not affected.
    for_each_data_path(|mode| async move {
        for (proxy, route, limit) in [
            (
                "connection_rate_per_ip = 3",
                "",
                Refusal::ConnectionRatePerIp,
            ),
            (
                "",
                "connection_rate_per_ip = 3",
                Refusal::RouteConnectionRatePerIp,
            ),
        ] {
            refuses_the_next(
                mode,
                Case {
                    proxy,
                    route,
                    admitted: &["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.2"],
                    refused: "127.0.0.2",
                    reason: Reason::MaxConnections,
                    limit,
                    frees_a_slot: false,
                },
            )
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_list() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "",
                route: "deny = [\"127.0.0.3/32\"]",
                admitted: &["127.0.0.2", "127.0.0.4"],
                refused: "127.0.0.3",
                reason: Reason::Denied,
                limit: Refusal::AccessList,
                frees_a_slot: false,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_admits_only_its_blocks_and_deny_wins() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "",
                route: "allow = [\"127.0.0.2\", \"127.0.0.4/30\"]\ndeny = [\"127.0.0.5\"]",
                admitted: &["127.0.0.2", "127.0.0.4", "127.0.0.6"],
                refused: "127.0.0.3",
                reason: Reason::Denied,
                limit: Refusal::AccessList,
                frees_a_slot: false,
            },
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_wins_over_allow() {
    for_each_data_path(|mode| {
        refuses_the_next(
            mode,
            Case {
                proxy: "",
                route: "allow = [\"127.0.0.4/30\"]\ndeny = [\"127.0.0.5\"]",
                admitted: &["127.0.0.4", "127.0.0.6"],
                refused: "127.0.0.5",
                reason: Reason::Denied,
                limit: Refusal::AccessList,
                frees_a_slot: false,
            },
        )
    })
    .await;
}
