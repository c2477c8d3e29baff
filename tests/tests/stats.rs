//! The control socket, on each data path:
//! - `stats` answers one JSON object with every key of the contract
//!   (docs/architecture.md#stats), every closure reason included at zero, and live figures for an open
//!   connection, and the keys added since (per-route closures, data paths and
//!   histograms; unrouted connections);
//! - the socket file has mode 0600;
//! - `connections` lists a live connection with its route, peers, target and bytes, and
//!   `stats` counts it on its target.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde_json::Value;
use smartproxy::config::DataPathMode;
use smartproxy::limits::Refusal;
use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on the control socket and parses the JSON reply.
async fn control(socket: PathBuf, request: &'static str) -> Value {
    let reply = within(
        "the control socket answers",
        tokio::task::spawn_blocking(move || smartproxy::control::query(&socket, request)),
    )
    .await
    .expect("control query task")
    .unwrap_or_else(|e| panic!("control request {request:?}: {e}"));
    serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!(
            "control reply to {request:?} is not JSON ({e}): {}",
            String::from_utf8_lossy(&reply)
        )
    })
}

/// The value at a dotted `path`; panics naming the first missing key.
fn field<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(value, |value, key| {
        value
            .get(key)
            .unwrap_or_else(|| panic!("stats: no key {path:?} (missing {key:?}) in {value}"))
    })
}

/// The number at a dotted `path`.
fn number(value: &Value, path: &str) -> u64 {
    let found = field(value, path);
    found
        .as_u64()
        .unwrap_or_else(|| panic!("stats: {path} is {found}, not a count"))
}

/// A connection through `route` that has moved `message` both ways and stays open.
async fn live_connection(proxy: &TestProxy, route: &str, message: &[u8]) -> TcpStream {
    let mut client = connect(proxy.addr(route)).await;
    client.write_all(message).await.expect("client writes");
    let mut echoed = vec![0u8; message.len()];
    within("the echo comes back", client.read_exact(&mut echoed))
        .await
        .expect("client reads the echo");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reply_has_every_contract_key_and_counts_a_live_connection() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let mut proxy = TestProxy::start(mode, &plain_route("web", backend.addr, "")).await;
        let client = live_connection(&proxy, "web", b"0123456789").await;
        // The path the proxy reports and books its connections on: on auto, the kernel
        // one (the harness's knobs splice at the first read).
        let path = booked_path(mode).to_string();

        let stats = control(proxy.control_socket(), "stats").await;
        assert_eq!(
            field(&stats, "data_path"),
            &Value::from(path.as_str()),
            "data_path"
        );
        number(&stats, "uptime_secs");
        for key in ["ebpf", "userspace", "half_open"] {
            number(&stats, &format!("connections.{key}"));
        }
        for key in [
            "sockhash_entries",
            "events",
            "events_lost",
            "splice_failures",
            "map_full",
            "moves_to_kernel",
            "moves_to_relay",
            "max_connections",
        ] {
            number(&stats, &format!("ebpf.{key}"));
        }
        // Counted in the kernel for this one-shot request, not for a `--watch` frame.
        let watch_frame = control(proxy.control_socket(), "stats-watch").await;
        assert_eq!(field(&watch_frame, "ebpf.map_entries"), &Value::Null);
        if splices(mode) {
            for map in ["sockets", "targets", "flows", "control"] {
                assert_eq!(
                    number(&stats, &format!("ebpf.map_entries.{map}")),
                    2,
                    "{map}: the live connection's two sockets"
                );
            }
        } else {
            assert_eq!(field(&stats, "ebpf.map_entries"), &Value::Null);
        }
        for reason in Reason::ALL {
            assert_eq!(
                number(&stats, &format!("closed.{reason}")),
                0,
                "closed.{reason}"
            );
        }
        assert_eq!(
            number(&stats, "connections.active"),
            1,
            "connections.active"
        );
        assert_eq!(number(&stats, "connections.total"), 1, "connections.total");
        assert_eq!(
            number(&stats, "bytes.client_to_backend"),
            10,
            "bytes.client_to_backend"
        );
        assert_eq!(
            number(&stats, "bytes.backend_to_client"),
            10,
            "bytes.backend_to_client"
        );
        let routes = field(&stats, "routes")
            .as_array()
            .expect("routes is a list");
        assert_eq!(routes.len(), 1, "one entry per route: {routes:?}");
        let web = &routes[0];
        assert_eq!(field(web, "name"), "web", "routes[0].name");
        assert_eq!(number(web, "active"), 1, "routes[0].active");
        assert_eq!(number(web, "total"), 1, "routes[0].total");
        assert_eq!(number(web, "bytes_client_to_backend"), 10);
        assert_eq!(number(web, "bytes_backend_to_client"), 10);
        // Keys added for the views and the metrics.
        assert_eq!(number(web, &path), 1, "routes[0].{path}");
        assert_eq!(number(web, "half_open"), 0, "routes[0].half_open");
        assert_eq!(number(&stats, &format!("connections.half_open_{path}")), 0);
        assert_eq!(
            number(&stats, "ebpf.moves_to_kernel"),
            u64::from(mode == DataPathMode::Auto),
            "ebpf.moves_to_kernel: the live connection's splice on auto"
        );
        assert_eq!(number(&stats, "ebpf.moves_to_relay"), 0);
        assert_eq!(number(web, "backend_connect_seconds.count"), 1);
        assert_eq!(number(web, "connection_duration_seconds.count"), 0);
        assert_eq!(number(&stats, "unrouted.active"), 0);
        for reason in Reason::ALL {
            assert_eq!(number(web, &format!("closed.{reason}")), 0);
            assert_eq!(number(&stats, &format!("unrouted.closed.{reason}")), 0);
        }
        for limit in Refusal::ALL {
            assert_eq!(number(&stats, &format!("refused.{limit}")), 0);
        }
        // The kernel's part of the route's bytes: all or part of them past the splice.
        for direction in ["client_to_backend", "backend_to_client"] {
            assert!(number(web, &format!("bytes_kernel_{direction}")) <= 10);
        }
        for key in ["resident_memory_bytes", "cpu_seconds", "start_time_seconds"] {
            let value = field(&stats, &format!("process.{key}"));
            assert!(value.as_f64().is_some(), "process.{key} is {value}");
        }

        drop(client);
        proxy.expect_closed(Reason::Normal).await;
        let stats = control(proxy.control_socket(), "stats").await;
        assert_eq!(
            number(&stats, "connections.active"),
            0,
            "active after the close"
        );
        assert_eq!(
            number(&stats, "closed.normal"),
            1,
            "closed.normal after the close"
        );
        let web = &field(&stats, "routes")
            .as_array()
            .expect("routes is a list")[0];
        assert_eq!(number(web, "closed.normal"), 1, "routes[0].closed.normal");
        assert_eq!(number(web, "connection_duration_seconds.count"), 1);
        assert_eq!(
            number(&stats, "bytes.client_to_backend"),
            10,
            "bytes kept after close"
        );
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_private_to_its_owner() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let proxy = TestProxy::start(mode, &plain_route("web", backend.addr, "")).await;
        let metadata = std::fs::metadata(proxy.control_socket()).expect("the control socket");
        assert_eq!(
            metadata.permissions().mode() & 0o777,
            0o600,
            "mode of {}",
            proxy.control_socket().display()
        );
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_lists_a_live_connection_with_route_peers_and_bytes() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(echo).await;
        let mut proxy = TestProxy::start(mode, &plain_route("web", backend.addr, "")).await;
        let client = live_connection(&proxy, "web", b"hello").await;

        let rows = control(proxy.control_socket(), "connections").await;
        let rows = rows.as_array().expect("connections is a list");
        assert_eq!(rows.len(), 1, "one live connection: {rows:?}");
        let row = &rows[0];
        assert_eq!(field(row, "route"), "web", "route");
        let client_addr = client.local_addr().expect("client address").to_string();
        assert_eq!(field(row, "client"), &Value::from(client_addr), "client");
        assert_eq!(
            field(row, "backend"),
            &Value::from(backend.addr.to_string()),
            "backend"
        );
        assert_eq!(
            field(row, "data_path"),
            &Value::from(booked_path(mode).to_string()),
            "data_path"
        );
        assert_eq!(
            field(row, "target"),
            &Value::from(backend.addr.to_string()),
            "target, as configured"
        );
        assert_eq!(number(row, "bytes_client_to_backend"), 5);
        assert_eq!(number(row, "bytes_backend_to_client"), 5);
        // The same connection in the target's stats.
        let stats = control(proxy.control_socket(), "stats").await;
        let targets = field(&stats, "targets")
            .as_array()
            .expect("targets is a list");
        assert_eq!(targets.len(), 1, "one target: {targets:?}");
        assert_eq!(field(&targets[0], "route"), "web");
        assert_eq!(field(&targets[0], "up"), &Value::Bool(true));
        assert_eq!(number(&targets[0], "active"), 1, "its live connection");

        drop(client);
        proxy.expect_closed(Reason::Normal).await;
        let rows = control(proxy.control_socket(), "connections").await;
        assert_eq!(rows, Value::Array(Vec::new()), "no rows after the close");
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}
